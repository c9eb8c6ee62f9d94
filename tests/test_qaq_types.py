"""qaq-gguf's cache types (qaq3, qaq2, the lean qaq4l, qaq3l, qaq2l, their head-64 siblings qaq4h, qaq3h, qaq2h, and
the trellis-coded tcq3, tcq2): the built ggml (CPU) against the numpy reference in qaq_gguf/quants.py.

Covers the ops the KV cache uses, run through ggml itself (ctypes, CPU backend): the reference quantizer and
dequantizer, SET_ROWS (what writes the cache), GET_ROWS, the K.q dot product and FLASH_ATTN_EXT with qaq K and/or V
over head sizes 64/128/256, GQA ratios 1-8 and batch 1 and 64.
"""
from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest

from qaq_gguf import cachetypes, ggml_ctypes, quants, scoring
from qaq_gguf.ggml_ctypes import DOT_FN, F32, I32, I64, Q8_0, ROW_FN, ROWS_FN, Graph

QAQ = ["qaq3", "qaq2", "qaq4l", "qaq3l", "qaq2l", "qaq4h", "qaq3h", "qaq2h"]
HEAD64 = ["qaq4h", "qaq3h", "qaq2h"]
LEAN = ["qaq4l", "qaq3l", "qaq2l"] + HEAD64  # one fp16 scale per block (128 or 64 values)
TCQ = ["tcq3", "tcq2"]  # trellis-coded: one fp16 scale per 64 values, a float codebook (no zero level)
OURS = QAQ + TCQ


def _row_bytes(name: str, n: int) -> int:
    return n // quants.BLOCK_VALUES[name] * quants.BLOCK_BYTES[name]


@pytest.fixture(scope="module")
def ggml():
    return ggml_ctypes.load()


def _tid(name: str) -> int:
    return cachetypes.get(name).type_id


def _gaussian(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.01, 30, (*shape[:-1], 1))).astype(np.float32)


# ---------------------------------------------------------------------------
# format and reference quantizer


def test_types_are_registered(ggml):
    base, _ = ggml
    for name, size, bits in (("qaq3", 14, 3.5), ("qaq2", 10, 2.5), ("qaq4l", 66, 4.125), ("qaq3l", 50, 3.125),
                             ("qaq2l", 34, 2.125), ("qaq4h", 34, 4.25), ("qaq3h", 26, 3.25), ("qaq2h", 18, 2.25),
                             ("tcq3", 26, 3.25), ("tcq2", 18, 2.25)):
        assert base.ggml_type_name(_tid(name)).decode() == name
        assert base.ggml_type_size(_tid(name)) == size
        assert cachetypes.bits(name) == bits


def test_ue5m3_is_the_top_byte_of_an_fp16():
    b = np.arange(quants.UE5M3_MAX + 1)
    d = quants.ue5m3_to_float(b)
    assert np.all(np.diff(d) > 0) and d[0] == 0 and d[-1] == 61440
    np.testing.assert_array_equal(quants.ue5m3_floor(d), b)
    np.testing.assert_array_equal(quants.ue5m3_floor(d[1:] * np.float32(0.9999)), b[:-1])
    assert quants.ue5m3_floor(np.float32(1e9)) == quants.UE5M3_MAX and quants.ue5m3_floor(np.float32(-1)) == 0


@pytest.mark.parametrize("name", OURS)
def test_cpu_quantizer_writes_the_reference_bytes(ggml, name):
    """ggml-cpu's from_float (SET_ROWS into the cache: the scale search or the trellis walk vectorized) writes the
    reference quantizer's bytes for every row: Gaussian rows of many scales, zeros, tiny and huge values, outliers, equal values, values on
    the level thresholds, inf and NaN."""
    base, cpu = ggml
    rng = np.random.default_rng(5)
    x = _gaussian((2000, 256), seed=2)
    x[0] = 0
    x[1, :16] = 0
    x[2, 40:48] = 1e-30
    x[3, :32] = 1e7
    x[4, ::5] *= 50
    x[5, :128] = 1e-6
    x[6] = np.repeat(rng.integers(-127, 128, 16), 16).astype(np.float32) * 0.5  # levels and thresholds, halves alike
    x[7, 3] = np.inf
    x[8, 9] = np.nan
    x[9] = -x[9]
    x[10:400] = np.round(x[10:400] * 4) / 4  # many ties
    traits = base.ggml_get_type_traits(_tid(name)).contents
    from_float = ROW_FN(cpu.ggml_get_type_traits_cpu(_tid(name)).contents.from_float)
    ref, got = (np.zeros((len(x), _row_bytes(name, 256)), np.uint8) for _ in range(2))
    for r in range(len(x)):
        ROW_FN(traits.from_float_ref)(x[r].ctypes.data, ref[r].ctypes.data, 256)
        from_float(x[r].ctypes.data, got[r].ctypes.data, 256)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", OURS)
def test_numpy_quantizer_is_bit_exact_with_ggml(ggml, name):
    base, _ = ggml
    x = _gaussian((300, 256), seed=1)
    x[0] = 0                        # all-zero block
    x[1, :16] = 0                   # one zero half
    x[2, 40:48] = 1e-30             # tiny (subnormal scale range)
    x[3, :32] = 1e7                 # beyond the largest scale: saturates, stays finite
    x[4, ::5] *= 50                 # outliers
    x[5, :128] = 1e-6               # a lean block of equal values
    out = np.zeros((300, _row_bytes(name, 256)), np.uint8)
    base.ggml_quantize_chunk(_tid(name), x.ctypes.data, out.ctypes.data, 0, 300, 256, None)
    np.testing.assert_array_equal(quants.quantize(x, name), out)
    assert base.ggml_validate_row_data(_tid(name), out.ctypes.data, out.nbytes)
    # from_float_ref (set_rows on CPU goes through the same function) and to_float
    traits = base.ggml_get_type_traits(_tid(name)).contents
    row = np.zeros(out.shape[1], np.uint8)
    ROW_FN(traits.from_float_ref)(x[4].ctypes.data, row.ctypes.data, 256)
    np.testing.assert_array_equal(row, out[4])
    y = np.zeros_like(x)
    ROW_FN(traits.to_float)(out.ctypes.data, y.ctypes.data, x.size)
    np.testing.assert_array_equal(quants.dequantize(out, name), y)
    assert np.all(np.isfinite(y)) and np.all(y[0] == 0)
    if name not in LEAN + TCQ:  # a zero half has its own zero scale (the lean and trellis codebooks have no zero level)
        assert np.all(y[1, :16] == 0)
    # saturated at the largest fp16 scale, not dropped (the int8 levels reach 127; the trellis codewords 3.1, and a
    # walk cannot repeat its largest)
    assert np.all(np.abs(y[3, :32]) > (3e4 if name in TCQ else 1e6))


def test_validation_rejects_non_finite_scales(ggml):
    base, _ = ggml
    blk = quants.quantize(np.ones(32, np.float32), "qaq3")
    assert base.ggml_validate_row_data(_tid("qaq3"), blk.ctypes.data, blk.nbytes)
    blk[0] = 0xF8  # decodes to inf
    assert not base.ggml_validate_row_data(_tid("qaq3"), blk.ctypes.data, blk.nbytes)


@pytest.mark.parametrize("name", QAQ)
def test_codebook_points_round_trip_exactly(name):
    """A block that is a representable scale times codebook levels is stored exactly (per 16 values for qaq3/qaq2,
    per block of 128 or 64 for the lean and head-64 types)."""
    rng = np.random.default_rng(2)
    T = quants.KVALUES[name]
    if name in LEAN:
        scales = rng.uniform(1e-3, 10, (64, 1)).astype(np.float16).astype(np.float32)
        idx = rng.integers(0, len(T), (64, quants.BLOCK_VALUES[name]))
        idx[:, 0] = len(T) - 1
        x = (scales * T[idx]).astype(np.float32)
    else:
        scales = quants.ue5m3_to_float(rng.integers(40, 200, (64, 2)))
        idx = rng.integers(0, len(T), (64, 32))
        idx[:, 0] = len(T) - 1  # the largest level present, so amax/127 is the scale
        idx[:, 16] = 0
        x = (np.repeat(scales, 16, axis=1) * T[idx]).astype(np.float32)
    np.testing.assert_array_equal(quants.roundtrip(x, name), x)


@pytest.mark.parametrize("name,lo,hi", [("qaq3", 2.4, 3.4), ("qaq2", 10.0, 15.0), ("qaq4l", 0.9, 1.2),
                                       ("qaq3l", 3.7, 4.9), ("qaq2l", 13.0, 18.0), ("qaq4h", 0.8, 1.1),
                                       ("qaq3h", 3.4, 4.6), ("qaq2h", 12.5, 17.5)])
def test_error_relative_to_q4_0_and_per_value_bound(name, lo, hi):
    """Gaussian rows (what the Hadamard-rotated cache holds): error in the designed range against q4_0, and every
    value within half the largest level gap (or the clipping distance) of the original."""
    x = np.random.default_rng(3).standard_normal((512, 256)).astype(np.float32)
    y = quants.roundtrip(x, name)
    q4 = scoring.quant_roundtrip(x, "q4_0", rotate=False)
    ratio = np.mean((y - x) ** 2) / np.mean((q4 - x) ** 2)
    assert lo < ratio < hi, ratio
    raw = quants.quantize(x, name).reshape(-1, quants.BLOCK_BYTES[name])
    if name in LEAN:
        d = np.repeat(np.ascontiguousarray(raw[:, :2]).view(np.float16).astype(np.float32), quants.BLOCK_VALUES[name],
                      axis=1)
    else:
        d = np.repeat(quants.ue5m3_to_float(raw[:, :2]), 16, axis=1)
    d = d.reshape(x.shape)
    T = quants.KVALUES[name]
    half_gap = np.max(np.diff(T)) / 2
    bound = np.maximum(d * half_gap, np.abs(x) - 127 * d) * (1 + 1e-6)
    assert np.all(np.abs(y - x) <= bound)


# ---------------------------------------------------------------------------
# ggml ops on the CPU backend


@pytest.mark.parametrize("name,d", [(t, 128) for t in OURS] + [(t, 64) for t in OURS if quants.BLOCK_VALUES[t] <= 64])
def test_set_rows_and_get_rows(ggml, name, d):
    """SET_ROWS (how llama.cpp writes the cache) stores the reference bytes at the given rows; GET_ROWS reads
    them back as the reference dequantization (rows of one head: 128 values, and 64 for the types whose blocks fit)."""
    n_rows = 16
    bb = _row_bytes(name, d)
    src = _gaussian((5, d), seed=4)
    rows = np.array([3, 0, 11, 7, 15], np.int64)
    with Graph(ggml) as g:
        dst = g.tensor(_tid(name), (d, n_rows), np.zeros((n_rows, bb), np.uint8))
        out = g.base.ggml_set_rows(g.ctx, dst, g.tensor(F32, (d, 5), src), g.tensor(I64, (5,), rows))
        g.compute(out)
        stored = g.read(dst, np.uint8, (n_rows, bb))
        np.testing.assert_array_equal(stored[rows], quants.quantize(src, name))
        assert not stored[[1, 2, 4]].any()
        sel = np.array([11, 3], np.int32)
        got = g.base.ggml_get_rows(g.ctx, dst, g.tensor(I32, (2,), sel))
        g.compute(got)
        np.testing.assert_array_equal(g.read(got, np.float32, (2, d)), quants.dequantize(stored[sel], name))


@pytest.mark.parametrize("name,d", [(t, 256) for t in OURS] + [(t, 64) for t in HEAD64 + TCQ])
def test_cpy_both_ways(ggml, name, d):
    """CPY f32 -> qaq and qaq -> f32: the K-shift reads a quantized K as f32, re-ropes it and copies it back."""
    x = _gaussian((6, d), seed=7)
    bb = _row_bytes(name, d)
    with Graph(ggml) as g:
        q = g.tensor(_tid(name), (d, 6))
        g.compute(g.base.ggml_cpy(g.ctx, g.tensor(F32, (d, 6), x), q))
        raw = g.read(q, np.uint8, (6, bb))
        np.testing.assert_array_equal(raw, quants.quantize(x, name))
        back = g.tensor(F32, (d, 6))
        g.compute(g.base.ggml_cpy(g.ctx, q, back))
        np.testing.assert_array_equal(g.read(back, np.float32, (6, d)), quants.dequantize(raw, name))


def _q8_0_roundtrip(x):
    """Q as ggml-cpu's SIMD quantize_row_q8_0 rounds it for the K.q dot product (x * (127/amax), rounded to
    nearest even; gguf-py's reference computes 1/(amax/127), which differs on exact ties)."""
    b = np.asarray(x, np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (np.round(b * inv) * d).astype(np.float32).reshape(np.shape(x))


@pytest.mark.parametrize("name", OURS)
def test_vec_dot_against_q8_0(ggml, name):
    """The K.q kernel (AVX2 where built for it, scalar otherwise) equals the dot product of the dequantized rows."""
    base, cpu = ggml
    traits = cpu.ggml_get_type_traits_cpu(_tid(name)).contents
    assert traits.vec_dot_type == Q8_0
    dot = DOT_FN(traits.vec_dot)
    rng = np.random.default_rng(6)
    qk = quants.BLOCK_VALUES[name]
    for n in (range(qk, 513, qk) if name in LEAN + TCQ else (32, 64, 256, 512)):
        for _ in range(20):
            k = rng.standard_normal(n).astype(np.float32) * rng.uniform(0.01, 10)
            q = rng.standard_normal(n).astype(np.float32)
            kq = quants.quantize(k, name)
            qq = gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0)
            s = ctypes.c_float()
            dot(n, ctypes.byref(s), 0, kq.ctypes.data, 0, qq.ctypes.data, 0, 1)
            q_val = gguf.quants.dequantize(qq, gguf.GGMLQuantizationType.Q8_0)
            ref = float(np.dot(quants.dequantize(kq, name).astype(np.float64), q_val.astype(np.float64)))
            scale = float(np.linalg.norm(quants.dequantize(kq, name)) * np.linalg.norm(q))
            assert abs(s.value - ref) <= 1e-5 * scale + 1e-6, (n, s.value, ref)


@pytest.mark.parametrize("name", OURS + ["q4_0", "q8_0"])
def test_vec_dot_rows_equals_one_row_at_a_time(ggml, name):
    """ggml_cpu_vec_dot_rows(type), which takes the query heads reading one K row in one pass (flash attention's
    decode), gives bit for bit each row's single-row vec_dot, for 1 to 9 rows (past the 4 rows of one pass). Every
    qaq and tcq type has one; q4_0 and q8_0 where the CPU backend is built for AVX2."""
    base, cpu = ggml
    ptr = cpu.ggml_cpu_vec_dot_rows(_tid(name))
    if name in OURS or cpu.ggml_cpu_has_avx2():
        assert ptr, name
    else:
        assert not ptr
        return
    rows = ROWS_FN(ptr)
    dot = DOT_FN(cpu.ggml_get_type_traits_cpu(_tid(name)).contents.vec_dot)
    rng = np.random.default_rng(8)
    n = 256
    k = rng.standard_normal(n).astype(np.float32) * 3
    k = quants.quantize(k, name) if name in OURS else gguf.quants.quantize(k, gguf.GGMLQuantizationType[name.upper()])
    for nq in range(1, 10):
        qq = gguf.quants.quantize(rng.standard_normal((nq, n)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        got = np.full(nq, np.nan, np.float32)
        rows(n, got.ctypes.data, k.ctypes.data, qq.ctypes.data, qq.shape[1], nq)
        one = ctypes.c_float()
        for r in range(nq):
            dot(n, ctypes.byref(one), 0, k.ctypes.data, 0, qq[r].ctypes.data, 0, 1)
            assert got[r] == one.value, (nq, r, got[r], one.value)


def _cache(x, type_name):
    """(rows of) x as stored in a cache of type_name: raw bytes for ggml, and the values the kernel reads."""
    if type_name in quants.BLOCK_BYTES:
        raw = quants.quantize(x, type_name)
        return raw, quants.dequantize(raw, type_name).reshape(x.shape)
    if type_name == "f16":
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    t = gguf.GGMLQuantizationType[type_name.upper()]
    raw = gguf.quants.quantize(x, t)
    return raw, gguf.quants.dequantize(raw, t).reshape(x.shape)


_FA_PAIRS = ["qaq3/qaq3", "qaq2/qaq2", "qaq3/qaq2", "q8_0/qaq2", "qaq3/f16", "f16/qaq3", "q4_0/qaq3", "qaq2/q8_0",
             "q8_0/q8_0", "qaq4l/qaq4l", "qaq3l/qaq2l", "qaq4l/qaq3", "q8_0/qaq3l", "qaq2l/f16", "qaq4h/qaq4h",
             "qaq3h/qaq2h", "qaq2h/qaq3", "q4_0/qaq3h", "qaq4h/f16", "qaq3l/qaq4h", "tcq3/tcq2", "tcq2/tcq3",
             "tcq3/f16", "q8_0/tcq2", "tcq3/qaq3h"]
_FA_SHAPES = [(64, 8, 1), (128, 4, 4), (256, 4, 1), (128, 8, 2)]


@pytest.mark.parametrize("kv,d,n_head,n_head_kv", [
    (kv, *shape) for kv in _FA_PAIRS for shape in _FA_SHAPES
    # a row holds whole blocks: the lean types need head sizes that are multiples of 128, the head-64 types of 64 (a
    # profile refuses them otherwise)
    if all(shape[0] % cachetypes.get(t).block_size == 0 for t in kv.split("/"))])
@pytest.mark.parametrize("n_q", [1, 64])
def test_flash_attn_ext(ggml, kv, d, n_head, n_head_kv, n_q):
    """FLASH_ATTN_EXT on the CPU with qaq K and/or V against attention over the dequantized cache: a batch of 64
    rows or more takes the tiled path (K and V tiles converted to f32, Q in f32), a single row the vector path (Q
    rounded to q8_0 for a quantized K, as K's vec_dot reads it); both accumulate in f32 (tests/test_flash_attn_cpu.py
    covers every type and pair)."""
    from test_flash_attn_cpu import _run  # the one FLASH_ATTN_EXT harness: numpy reference, the op, no mask here

    tk, tv = kv.split("/")
    got, ref = _run(ggml, tk, tv, d, n_head, n_head_kv, n_q, 96, masked=False, seed=d * 131 + n_head * 7 + n_q)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
