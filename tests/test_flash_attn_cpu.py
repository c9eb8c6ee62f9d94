"""CPU FLASH_ATTN_EXT for every cache type and K/V pair (patches/0012): the tiled path (prefill, 64 rows or more)
and the grouped vector path (decode, and the KV-split decode from 256 cells on) against attention in float64 over
the values the cache holds.

What each path reads: the tiled path converts K and V tiles to f32 and keeps Q in f32; the vector path dots each K
row in K's own vec_dot type (Q rounded to q8_0 for a quantized K, to f16 for an f16 K) and accumulates V in f32.
Masks with a sliding window, logit soft-capping, GQA 1-8, head sizes 64/128/256.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import gguf

from qaq_gguf import scoring
from qaq_gguf.ggml_ctypes import F16, F32, ROW_FN, Graph
from test_qaq_types import _gaussian, _q8_0_roundtrip, _tid, ggml  # noqa: F401
from test_qaq_types import _cache as _cache_gguf

PAIRS = ["f16/f16", "q8_0/q8_0", "q4_0/q4_0", "q5_0/q5_0", "q4_1/q5_1", "iq4_nl/iq4_nl", "qaq3/qaq3", "qaq2/qaq2",
         "q8_0/qaq3", "qaq3/f16", "f16/q4_0", "qaq2/q8_0", "qaq4l/qaq4l", "qaq3l/qaq2l", "qaq4l/q8_0", "qaq4h/qaq4h",
         "qaq3h/qaq2h", "qaq4h/q8_0", "f16/qaq2h", "qaq3h/qaq4l", "tcq3/tcq3", "tcq2/q8_0"]


@pytest.mark.parametrize("name", ["f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "qaq3", "qaq2", "qaq4l",
                                  "qaq3l", "qaq2l", "qaq4h", "qaq3h", "qaq2h", "tcq3", "tcq2"])
def test_row_dequantization_is_to_float(ggml, name):
    """ggml_cpu_dequantize_row, which converts flash attention's K and V rows (AVX2 kernels for q8_0, q4_0, q5_0,
    iq4_nl and the qaq types), gives bit for bit the values of the type's own to_float, one row or many at once."""
    base, cpu = ggml
    x = _gaussian((300, 256), seed=11)
    x[0] = 0.0
    x[1, 100:] = -x[1, 100:] * 1e4
    traits = base.ggml_get_type_traits(_tid(name)).contents
    raw = np.zeros((300, 256 // traits.blck_size * traits.type_size), np.uint8)
    base.ggml_quantize_chunk(_tid(name), x.ctypes.data, raw.ctypes.data, 0, 300, 256, None)
    ref = np.zeros_like(x)
    ROW_FN(traits.to_float)(raw.ctypes.data, ref.ctypes.data, x.size)
    got = np.full_like(x, np.nan)
    cpu.ggml_cpu_dequantize_row(_tid(name), raw.ctypes.data, got.ctypes.data, x.size)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    one = np.full(256, np.nan, np.float32)
    cpu.ggml_cpu_dequantize_row(_tid(name), raw[7].ctypes.data, one.ctypes.data, 256)
    np.testing.assert_array_equal(one.view(np.uint32), ref[7].view(np.uint32))


def _cache(x, type_name):
    """(raw bytes, values the kernel reads) of x in a cache of type_name (iq4_nl: the cache's own quantizer port)."""
    if type_name == "iq4_nl":
        raw = scoring._quantize_iq4_nl(x)
        return raw, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.IQ4_NL).reshape(x.shape)
    return _cache_gguf(x, type_name)


def _q_as_read(q, tk, n_q):
    if n_q >= 64:  # tiled: Q stays f32
        return q
    return q.astype(np.float16).astype(np.float32) if tk == "f16" else _q8_0_roundtrip(q)


def _mask(n_q, n_kv, window):
    """llama.cpp's causal mask for queries at the last n_q positions, optionally with a sliding window."""
    pos_q = np.arange(n_kv - n_q, n_kv)[:, None]
    pos_k = np.arange(n_kv)[None, :]
    ok = pos_k <= pos_q
    if window:
        ok &= pos_q - pos_k < window
    return np.where(ok, 0.0, -np.inf).astype(np.float32)


def _run(ggml, tk, tv, d, n_head, n_head_kv, n_q, n_kv, *, window=0, softcap=0.0, masked=True, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_head, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    k_raw, k_val = _cache(k, tk)
    v_raw, v_val = _cache(v, tv)
    scale = 1.0 / np.sqrt(d)
    m = _mask(n_q, n_kv, window) if masked else np.zeros((n_q, n_kv), np.float32)
    # reference: softmax(softcap * tanh(s / softcap) + mask) v, in float64
    qe = _q_as_read(q, tk, n_q).astype(np.float64)
    rep = n_head // n_head_kv
    kk = np.repeat(k_val, rep, axis=0).astype(np.float64)
    vv = np.repeat(v_val, rep, axis=0).astype(np.float64)
    s = np.einsum("hqd,hkd->hqk", qe, kk) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = s + m[None]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("hqk,hkd->qhd", p, vv)
    return _flash_attn(ggml, tk, tv, q, k_raw, v_raw, m if masked else None, scale, softcap), ref


def _flash_attn(ggml, tk, tv, q, k_raw, v_raw, m, scale, softcap=0.0, exact=None) -> np.ndarray:
    """FLASH_ATTN_EXT on the CPU: q (n_head, n_q, d) f32, K/V cache bytes of types tk/tv, mask m (n_q, n_kv) or None,
    exact: (K, V) f16 rows (n_head_kv, n_exact, d) for ggml_flash_attn_ext_set_exact_rows. Returns (n_q, n_head, d)."""
    n_head, n_q, d = q.shape
    n_head_kv, n_kv = k_raw.shape[:2]  # cache bytes keep the rows' leading dims (_cache)
    with Graph(ggml) as g:
        tq = g.tensor(F32, (d, n_q, n_head), q)
        tkk = g.tensor(_tid(tk), (d, n_kv, n_head_kv), k_raw)
        tvv = g.tensor(_tid(tv), (d, n_kv, n_head_kv), v_raw)
        tm = None
        if m is not None:
            n_pad = -(-n_q // 64) * 64  # llama.cpp pads the mask rows
            mm = np.full((n_pad, n_kv), -np.inf, np.float32)
            mm[:n_q] = m
            tm = g.tensor(F16, (n_kv, n_pad), mm.astype(np.float16))
        out = g.base.ggml_flash_attn_ext(g.ctx, tq, tkk, tvv, tm, scale, 0.0, softcap)
        if exact is not None:
            ke, ve = exact
            g.base.ggml_flash_attn_ext_set_exact_rows(out, g.tensor(F16, (d, ke.shape[1], n_head_kv), ke),
                                                      g.tensor(F16, (d, ve.shape[1], n_head_kv), ve))
        g.compute(out)
        return g.read(out, np.float32, (n_q, n_head, d))


@pytest.mark.parametrize("kv", PAIRS)
@pytest.mark.parametrize("n_q,n_kv", [(1, 96), (1, 600), (512, 640)])
def test_every_pair_both_paths(ggml, kv, n_q, n_kv):
    tk, tv = kv.split("/")
    got, ref = _run(ggml, tk, tv, 128, 8, 2, n_q, n_kv, seed=n_q + n_kv)
    # q4_1/q5_1 keys dot with Q as q8_1 (a block sum beside the scale), which the q8_0 model of Q only approximates
    tol = 1e-3 if tk in ("q4_1", "q5_1") and n_q < 64 else 2e-4
    np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("d,n_head,n_head_kv", [(64, 8, 1), (128, 4, 4), (256, 4, 1), (128, 16, 2), (64, 8, 8)])
@pytest.mark.parametrize("n_q", [1, 512])
@pytest.mark.parametrize("kv", ["q4_0/q4_0", "qaq3/qaq2", "f16/f16", "qaq4h/qaq4h", "qaq3h/qaq2h", "qaq2h/q8_0",
                                "tcq3/tcq2"])
def test_head_sizes_and_gqa(ggml, kv, d, n_head, n_head_kv, n_q):
    tk, tv = kv.split("/")
    got, ref = _run(ggml, tk, tv, d, n_head, n_head_kv, n_q, 576, seed=d + n_head)
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("n_q", [1, 100, 512])
@pytest.mark.parametrize("kv", ["q8_0/q4_0", "qaq3/qaq3", "f16/f16"])
def test_sliding_window_and_softcap(ggml, kv, n_q):
    tk, tv = kv.split("/")
    got, ref = _run(ggml, tk, tv, 128, 4, 1, n_q, 700, window=256, seed=3)
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    got, ref = _run(ggml, tk, tv, 128, 4, 1, n_q, 700, softcap=30.0, seed=4)
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)


def test_no_mask_and_odd_lengths(ggml):
    for n_q, n_kv in ((65, 97), (130, 70), (1, 257)):
        got, ref = _run(ggml, "qaq2", "q4_0", 64, 4, 2, n_q, n_kv, masked=False, seed=n_q)
        np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    assert ctypes.sizeof(ctypes.c_float) == 4


def _run_exact(ggml, tk, tv, d, n_head, n_head_kv, n_q, n_kv, n_exact, seed=0):
    """FLASH_ATTN_EXT with exact rows (patches/0031): the first n_exact rows of K and V read from f16 side tensors,
    whatever the quantized cache holds there (here: rows 1000 times too large), against float64 attention over the
    values each row is read from (an exact K row dots with Q in f32)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_head, n_q, d)).astype(np.float32)
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)
    k[:, :n_exact] *= 3.0  # sinks: keys that draw attention
    ke = k[:, :n_exact].astype(np.float16)
    ve = v[:, :n_exact].astype(np.float16)
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[:, :n_exact] *= 1000.0
    v_bad[:, :n_exact] *= 1000.0
    k_raw, k_val = _cache(k_bad, tk)
    v_raw, v_val = _cache(v_bad, tv)
    k_val[:, :n_exact] = ke
    v_val[:, :n_exact] = ve
    scale = 1.0 / np.sqrt(d)
    m = _mask(n_q, n_kv, 0)
    rep = n_head // n_head_kv
    kk = np.repeat(k_val, rep, axis=0).astype(np.float64)
    vv = np.repeat(v_val, rep, axis=0).astype(np.float64)
    s = np.einsum("hqd,hkd->hqk", _q_as_read(q, tk, n_q).astype(np.float64), kk)
    s[:, :, :n_exact] = np.einsum("hqd,hkd->hqk", q.astype(np.float64), kk[:, :n_exact])
    s = s * scale + m[None]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("hqk,hkd->qhd", p, vv)
    return _flash_attn(ggml, tk, tv, q, k_raw, v_raw, m, scale, exact=(ke, ve)), ref


@pytest.mark.parametrize("kv,d", [("q4_0/q4_0", 128), ("qaq3/qaq2", 128), ("qaq4h/qaq3h", 64), ("f16/f16", 64),
                                  ("qaq2l/q8_0", 256)])
@pytest.mark.parametrize("n_q,n_kv,n_exact", [(1, 96, 4), (1, 600, 16), (512, 640, 4), (100, 130, 70), (1, 300, 1)])
def test_exact_rows_replace_the_first_cells(ggml, kv, d, n_q, n_kv, n_exact):
    """Every CPU path (grouped decode, split-KV decode from 256 cells, tiled prefill; exact rows across tiles and
    chunks) reads the exact rows and ignores what the cache holds in their place."""
    if not hasattr(ggml[0], "ggml_flash_attn_ext_set_exact_rows"):
        pytest.fail("this build has no ggml_flash_attn_ext_set_exact_rows (patches/0031)")
    tk, tv = kv.split("/")
    got, ref = _run_exact(ggml, tk, tv, d, 8, 2, n_q, n_kv, n_exact, seed=n_kv + n_exact)
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
