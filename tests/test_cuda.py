"""CUDA checks (run on the GPU machine; skipped cleanly where the build or the machine has no CUDA).

Build there with  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90
-DQAQ_BUILD_TEST_BACKEND_OPS=ON" (the last switch adds llama.cpp's test-backend-ops, which compares every CUDA op
on the qaq and tcq types with the CPU backend over many shapes).
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import has_cuda
from qaq_gguf import _native, profile

pytestmark = pytest.mark.skipif(not has_cuda(), reason="no CUDA backend in this build, or no GPU")


def _logits(gemma, tokens, n_gpu_layers, **kw):
    import qaq_gguf

    llm = qaq_gguf.Llama(str(gemma), n_ctx=512, n_gpu_layers=n_gpu_layers, logits_all=True, verbose=False, **kw)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)]), llm


def test_generate_fully_offloaded(gemma):
    import qaq_gguf

    llm = qaq_gguf.Llama(str(gemma), n_ctx=256, n_gpu_layers=99, verbose=False, seed=0)
    out = llm("The capital of France is", max_tokens=16, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip()


@pytest.mark.parametrize("tk,tv,tol", [("f16", "f16", 0.05), ("q8_0", "q4_0", 0.3), ("q8_0", "qaq3", 0.3),
                                       ("qaq3", "qaq2", 0.5), ("q8_0", "tcq3", 0.3), ("tcq3", "tcq2", 0.5)])
def test_mixed_profile_on_gpu_matches_cpu(gemma, gemma_ident, eval_text, tmp_path, tk, tv, tol):
    # alternate the pair across layers so every layer type combination is exercised
    ks = [tk if il % 2 else tv for il in range(gemma_ident.n_layer)]
    vs = [tv if il % 2 else tk for il in range(gemma_ident.n_layer)]
    f = profile.write_profile(profile.make_profile(gemma_ident, ks, vs), tmp_path / "mixed.gguf")
    import qaq_gguf

    tok = qaq_gguf.Llama(str(gemma), vocab_only=True, verbose=False).tokenize(eval_text[:3000].encode())[:200]
    cpu, _ = _logits(gemma, tok, 0, kv_profile=str(f))
    gpu, llm = _logits(gemma, tok, 99, kv_profile=str(f))
    assert [r["type_k"] for r in llm.kv_layer_info()] == ks
    # same model, same cache types: logits agree within the tolerance of the types (different kernels round
    # differently), and the greedy choice agrees almost everywhere
    assert np.abs(cpu - gpu).max() < tol * np.abs(cpu).max()
    assert np.mean(cpu.argmax(1) == gpu.argmax(1)) > 0.97


def test_centred_keys_on_gpu_match_cpu(gemma, gemma_ident, eval_text, tmp_path):
    """Centred keys (qaq.kv.k_mean): the CUDA graph subtracts the mean before SET_ROWS like the CPU one."""
    import qaq_gguf

    rng = np.random.default_rng(0)
    n = gemma_ident.n_key_mean()
    p = profile.make_profile(gemma_ident, "q8_0", "qaq3")
    p.k_mean = (rng.standard_normal(n) * 0.5).astype(np.float32)
    f = profile.write_profile(p, tmp_path / "centred.gguf")
    tok = qaq_gguf.Llama(str(gemma), vocab_only=True, verbose=False).tokenize(eval_text[:3000].encode())[:200]
    cpu, _ = _logits(gemma, tok, 0, kv_profile=str(f))
    gpu, _ = _logits(gemma, tok, 99, kv_profile=str(f))
    assert np.abs(cpu - gpu).max() < 0.3 * np.abs(cpu).max()
    assert np.mean(cpu.argmax(1) == gpu.argmax(1)) > 0.97


def test_pair_without_a_cuda_kernel_is_refused(gemma, gemma_ident, tmp_path):
    # iq4_nl has no CUDA flash-attention kernel: the profile must be refused, naming the pair, not run slowly
    f = profile.write_profile(profile.make_profile(gemma_ident, "q8_0", "iq4_nl"), tmp_path / "p.gguf")
    import qaq_gguf

    with pytest.raises(profile.ProfileError, match="iq4_nl"):
        qaq_gguf.Llama(str(gemma), kv_profile=str(f), n_ctx=256, n_gpu_layers=99, verbose=False)


def test_calibration_candidates_follow_the_backend():
    from qaq_gguf import calibrate

    assert "iq4_nl" not in calibrate.default_candidates()  # no CUDA flash-attention kernel for it
    assert {"tcq3", "tcq2"} <= set(calibrate.default_candidates())  # patches/0033


@pytest.mark.parametrize("family", ["qaq", "tcq"])
@pytest.mark.parametrize("op", ["SET_ROWS", "GET_ROWS", "CPY", "FLASH_ATTN_EXT"])
def test_backend_ops_qaq_types_match_cpu(op, family):
    """llama.cpp's test-backend-ops on the qaq and tcq cases: CUDA against the CPU backend (head sizes 64/128/256,
    GQA 1-8, batch 1 to 512, every pair with a CUDA kernel)."""
    exe = _native.bin_dir() / "test-backend-ops"
    if not exe.is_file():
        pytest.skip("built without -DQAQ_BUILD_TEST_BACKEND_OPS=ON")
    r = subprocess.run([str(exe), "-o", op, "-b", "CUDA0", "-p", family], capture_output=True, text=True, timeout=1800)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert "FAIL" not in r.stdout and " OK" in r.stdout, tail


def test_qaq_generation_offloaded(gemma, gemma_ident, tmp_path):
    f = profile.write_profile(profile.make_profile(gemma_ident, "qaq3", "qaq2"), tmp_path / "q.gguf")
    import qaq_gguf

    llm = qaq_gguf.Llama(str(gemma), kv_profile=str(f), n_ctx=512, n_gpu_layers=99, verbose=False, seed=0)
    out = llm("The capital of France is", max_tokens=16, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0
