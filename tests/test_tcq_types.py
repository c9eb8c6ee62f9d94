"""The trellis-coded cache types tcq3 and tcq2 (patches/0032, native/ggml/ggml-qaq-common.h): what is particular to
them. The ops they share with the qaq types (reference bytes, numpy port byte for byte, SET_ROWS, GET_ROWS, CPY,
the K.q dot product, FLASH_ATTN_EXT over head sizes and GQA) are in tests/test_qaq_types.py and
tests/test_flash_attn_cpu.py, parametrized over both families.

Here: one codebook in four places (the C header, the numpy port, the generator, the Vulkan shaders' copy in
patches/0035; CUDA compiles the header), the error the trellis buys over the
scalar types of the same size, blocks with nothing to code, damaged scales refused, and the types in a real model's
cache: a K-shift and a saved state.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from qaq_gguf import Llama, cachetypes, ggml_ctypes, profile, quants, trellis
from test_profile import _tokens, shift_agreement, state_round_trip

HEADER = Path(__file__).resolve().parent.parent / "native" / "ggml" / "ggml-qaq-common.h"
KW = dict(n_ctx=256, n_batch=64, verbose=False, flash_attn=True, logits_all=True)


def _header_floats(name: str) -> np.ndarray:
    text = HEADER.read_text()
    m = re.search(rf"#define {name} \\\n((?:.*\\\n)*.*)\n", text)
    assert m, name
    vals = [float.fromhex(v.strip()[:-1]) for v in m.group(1).replace("\\", "").split(",") if v.strip()]
    return np.array(vals, np.float32)


@pytest.mark.parametrize("k", [3, 2])
def test_one_codebook_in_the_header_the_port_and_the_generator(k):
    """ggml's table (hex literals), the numpy port's (float bits) and trellis.codebook(k, 8), which computed both,
    agree bit for bit; so do the walk scales rho."""
    c = _header_floats(f"QAQ_TCQ{k}_CODEBOOK")
    assert c.shape == (256,)
    np.testing.assert_array_equal(c.view(np.uint32), quants.TCQ_CODEBOOK[k].view(np.uint32))
    table, rho = trellis.codebook(k, 8)
    np.testing.assert_array_equal(table.view(np.uint32), c.view(np.uint32))
    rho_c = re.search(rf"#define QAQ_TCQ{k}_RHO (\S+)f", HEADER.read_text()).group(1)
    assert np.float32(float.fromhex(rho_c)) == np.float32(rho) == quants.TCQ_RHO[k]
    # the Vulkan shaders' copy (GLSL has no hex floats: the float32 bits) and their walk scales
    patch = next((HEADER.parents[2] / "patches").glob("*-ggml-vulkan-tcq3-and-tcq2.patch")).read_text()
    m = re.search(rf"\+const uint tcq{k}_codebook_bits\[256\] = uint\[256\]\(\n((?:\+.*\n)+?)\+?.*\);", patch)
    assert m, f"tcq{k}_codebook_bits not in the Vulkan patch"
    glsl = np.array([int(v, 16) for v in re.findall(r"0x([0-9A-F]{8})u", m.group(0))], np.uint32)
    np.testing.assert_array_equal(glsl, c.view(np.uint32))
    rho_glsl = re.search(r"const float rho = uintBitsToFloat\(TCQ_K == 3u \? (0x[0-9A-F]+)u : (0x[0-9A-F]+)u\);",
                         patch).group(1 if k == 3 else 2)
    assert np.uint32(int(rho_glsl, 16)) == np.float32(rho).view(np.uint32)


@pytest.mark.parametrize("name,scalar,lo,hi", [("tcq3", "qaq3h", 0.78, 0.92), ("tcq2", "qaq2h", 0.79, 0.93)])
def test_error_below_the_scalar_type_of_the_same_size(name, scalar, lo, hi):
    """On Gaussian rows (the Hadamard-rotated cache), at the same bits per value: the trellis's squared error is
    below the scalar head-64 type's with its scale search (measured 0.85x at 3 bits, 0.86x at 2 bits; with the
    least-squares scale, before the unshrunk one, 0.83x and 0.79x), and no block is shrunk: its reconstruction's
    component along it is itself, to the fp16 scale's rounding."""
    assert cachetypes.bits(name) == cachetypes.bits(scalar)
    x = np.random.default_rng(3).standard_normal((256, 256)).astype(np.float32)
    y = quants.roundtrip(x, name)
    ratio = np.mean((y - x) ** 2) / np.mean((quants.roundtrip(x, scalar) - x) ** 2)
    assert lo < ratio < hi, ratio
    xb, yb = x.reshape(-1, 64).astype(np.float64), y.reshape(-1, 64).astype(np.float64)
    np.testing.assert_allclose(np.sum(xb * yb, axis=1) / np.sum(xb * xb, axis=1), 1.0, atol=2.0 ** -11)


@pytest.mark.parametrize("name", ["tcq3", "tcq2"])
def test_blocks_with_nothing_to_code(name):
    """All zeros, an infinity or a NaN in a block: scale 0 and every input 0, by numpy and by ggml alike (the other
    blocks of the row are coded as usual)."""
    base, _ = ggml_ctypes.load()
    x = np.random.default_rng(4).standard_normal((4, 128)).astype(np.float32)
    x[0, :64] = 0
    x[1, 5] = np.inf
    x[2, 70] = np.nan
    x[3, 64:] = -np.inf
    tid = cachetypes.get(name).type_id
    out = np.zeros((4, 2 * quants.BLOCK_BYTES[name]), np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        base.ggml_quantize_chunk(tid, x.ctypes.data, out.ctypes.data, 0, 4, 128, None)
        ref = quants.quantize(x, name)
    np.testing.assert_array_equal(ref, out)
    blocks = out.reshape(8, -1)
    dead = [0, 2, 5, 7]  # (row, block) (0, 0), (1, 0), (2, 1), (3, 1)
    assert not blocks[dead].any()
    assert np.all(blocks[[1, 3, 4, 6], :2].view(np.uint16) != 0)
    y = quants.dequantize(out, name).reshape(8, 64)
    assert np.all(y[dead] == 0) and np.all(np.isfinite(y))


@pytest.mark.parametrize("name", ["tcq3", "tcq2"])
def test_damaged_scales_are_refused(name):
    """ggml_validate_row_data (what a state load checks) refuses a block whose fp16 scale is inf or NaN."""
    base, _ = ggml_ctypes.load()
    tid = cachetypes.get(name).type_id
    blk = quants.quantize(np.random.default_rng(5).standard_normal(128).astype(np.float32), name)
    assert base.ggml_validate_row_data(tid, blk.ctypes.data, blk.nbytes)
    for bad in (0x7C00, 0x7E00, 0xFC00):  # inf, NaN, -inf
        b = blk.copy()
        b[quants.BLOCK_BYTES[name]:][:2] = np.array([bad], np.uint16).view(np.uint8)
        assert not base.ggml_validate_row_data(tid, b.ctypes.data, b.nbytes)


@pytest.fixture(scope="module")
def smol_ident(smollm2):
    return profile.model_identity(smollm2)


def test_context_shift_of_a_tcq3_key_cache(smollm2, smol_ident, eval_text, tmp_path):
    """A K-shift reads the trellis-coded, rotated K cache as f32, re-ropes it and codes it again (CPY both ways): on
    SmolLM2 (head 64, GQA) the shifted cache agrees with the f16 cache doing the same about as well as without the
    shift."""
    p = profile.write_profile(profile.make_profile(smol_ident, "tcq3", "f16"), tmp_path / "k.gguf")
    ref, llm = Llama(str(smollm2), **KW), Llama(str(smollm2), kv_profile=str(p), **KW)
    assert {(r["type_k"], r["type_v"]) for r in llm.kv_layer_info()} == {("tcq3", "f16")}
    agree = shift_agreement(ref, llm, _tokens(ref, eval_text, 200))
    # 50 greedy tokens: plain tcq3 keys (no transforms) agree on 35-36 of them; a broken cache on a handful
    assert agree[False] >= 0.6 and agree[True] >= agree[False] - 0.15, agree


def test_state_round_trip(smollm2, smol_ident, tmp_path):
    """A saved state of a tcq3/tcq2 cache restores the same next-token logits, bit for bit; a state of another
    profile is refused."""
    path = profile.write_profile(profile.make_profile(smol_ident, "tcq3", "tcq2"), tmp_path / "t.gguf")
    llm = Llama(str(smollm2), kv_profile=str(path), **KW)
    state, first, again = state_round_trip(llm, add_bos=False)
    assert np.array_equal(first, again)
    other = profile.write_profile(profile.make_profile(smol_ident, "qaq3h", "qaq2h"), tmp_path / "o.gguf")
    with pytest.raises(RuntimeError):
        Llama(str(smollm2), kv_profile=str(other), **KW).load_state(state)
