"""The qaq cache types on llama.cpp's Vulkan backend, checked against the CPU backend (issue 23).

Runs on any Vulkan device, including Mesa's software driver (lavapipe, package mesa-vulkan-drivers), which makes the
GPU code path testable on a CPU-only machine. Needs a build with `-DGGML_VULKAN=on -DQAQ_BUILD_TEST_BACKEND_OPS=ON`
(test-backend-ops and qaq-test-backend-quant next to the other tools, or in $QAQ_VULKAN_BIN_DIR, e.g. a separate
build folder); skipped by name where the binaries, the Vulkan backend or a device are missing.

Environment: llama.cpp ignores CPU-type Vulkan devices unless GGML_VK_VISIBLE_DEVICES names them (set to 0 here
unless already set); Mesa's compiled shaders are kept in $MESA_SHADER_CACHE_DIR (default: a folder in the qaq-gguf
cache), which makes reruns much faster on lavapipe.

Run: pytest -m vulkan tests/test_vulkan.py
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.vulkan

QAQ_TYPES = ["qaq3", "qaq2", "qaq4l", "qaq3l", "qaq2l", "qaq4h", "qaq3h", "qaq2h"]
LEAN = {"qaq4l", "qaq3l", "qaq2l"}


def _bin_dir() -> Path:
    explicit = os.environ.get("QAQ_VULKAN_BIN_DIR")
    if explicit:
        return Path(explicit)
    from qaq_gguf import _native

    return _native.bin_dir()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
    cache = Path(os.environ.get("QAQ_GGUF_CACHE", Path.home() / ".cache" / "qaq-gguf")) / "mesa-shader-cache"
    env.setdefault("MESA_SHADER_CACHE_DIR", str(cache))
    return env


def _exe(name: str) -> Path:
    exe = _bin_dir() / name
    if not exe.is_file():
        pytest.skip(f"{name} not found in {_bin_dir()}: build with -DGGML_VULKAN=on -DQAQ_BUILD_TEST_BACKEND_OPS=ON "
                    "(or point QAQ_VULKAN_BIN_DIR at such a build)")
    return exe


@pytest.fixture(scope="module")
def quant_run() -> subprocess.CompletedProcess:
    """qaq-test-backend-quant on Vulkan0, once: it also tells whether there is a Vulkan device at all (exit 77)."""
    exe = _exe("qaq-test-backend-quant")
    r = subprocess.run([str(exe), "Vulkan0", "128"], capture_output=True, text=True, timeout=1800, env=_env())
    if r.returncode == 77:
        pytest.skip(f"no Vulkan device: {r.stdout.strip()[-300:]} (on Debian: apt install mesa-vulkan-drivers; "
                    "a build without -DGGML_VULKAN=on has no Vulkan backend)")
    return r


def test_quantizer_bytes_match_the_c_reference(quant_run):
    """SET_ROWS/CPY into every qaq type writes the C reference's bytes; CPY back to f32 gives its values bit for bit."""
    out = quant_run.stdout + quant_run.stderr
    assert quant_run.returncode == 0, out[-4000:]
    assert "ALL OK" in out
    for t in QAQ_TYPES:
        assert f"{t:<6}  quantize: 0/" in out, out[-4000:]


def _backend_ops(op: str, params: str, timeout: int) -> str:
    exe = _exe("test-backend-ops")
    r = subprocess.run([str(exe), "-b", "Vulkan0", "-o", op, "-p", params], capture_output=True, text=True,
                       timeout=timeout, env=_env())
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "FAIL" not in r.stdout and "not supported" not in r.stdout, out[-4000:]
    m = re.search(r"(\d+)/(\d+) tests passed", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0, out[-4000:]  # some cases ran, all passed
    return out


@pytest.mark.parametrize("op", ["SET_ROWS", "GET_ROWS", "CPY"])
def test_backend_ops_qaq_types_match_cpu(quant_run, op):
    """llama.cpp's test-backend-ops qaq cases (patches/0009, 0016, 0026): Vulkan against the CPU backend."""
    _backend_ops(op, "qaq", timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("tk,tv", [(t, t) for t in QAQ_TYPES] + [("f16", "qaq3"), ("q8_0", "qaq2h"),
                                                                  ("qaq4l", "q4_0"), ("qaq3h", "qaq4h")])
def test_flash_attention_qaq_decode_matches_cpu(quant_run, tk, tv):
    """FLASH_ATTN_EXT on the scalar path with qaq K and/or V: decode (one token) at head size 128 (and 64 where
    the types allow it), GQA 1 and 4, padded and unpadded caches. Prefill shapes compile large shader variants,
    minutes each on bookworm's Mesa 22.3 lavapipe: left to the GPU machines."""
    hs = "128" if {tk, tv} & LEAN else "(64|128)"
    params = (rf"hsk={hs},hsv={hs},nh=2,nr23=\[(1|4),1\],kv=(512|113),nb=1,mask=1,sinks=0,max_bias=0\.000000,"
              rf"logit_softcap=0\.000000,prec=f32,type_K={tk},type_V={tv},")
    _backend_ops("FLASH_ATTN_EXT", params, timeout=1800)


def _has_vulkan_llama() -> bool:
    """The loaded libllama (QAQ_GGUF_LIB_DIR or the installed package) has the Vulkan backend and sees a device."""
    from qaq_gguf import _native

    os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
    try:
        import llama_cpp

        llama_cpp.llama_backend_init()
        return "Vulkan" in _native.backend_names()
    except Exception:
        return False


def _logits(model, tokens, n_gpu_layers, **kw):
    import numpy as np

    import qaq_gguf

    llm = qaq_gguf.Llama(str(model), n_ctx=512, n_gpu_layers=n_gpu_layers, logits_all=True, verbose=False,
                         flash_attn=True, **kw)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)]), llm


@pytest.mark.slow
@pytest.mark.parametrize("model_name,tk,tv,tol", [("gemma", "q8_0", "qaq3", 0.3), ("gemma", "qaq4l", "qaq2l", 0.5),
                                                  ("smollm2", "qaq4h", "qaq3h", 0.5)])
def test_mixed_profile_on_vulkan_matches_cpu(request, eval_text, tmp_path, model_name, tk, tv, tol):
    """A real model with a mixed qaq profile, every layer offloaded to Vulkan, against the CPU: logits within the
    types' tolerance, greedy choice the same almost everywhere. Needs libllama built with -DGGML_VULKAN=on (the
    installed package's, or QAQ_GGUF_LIB_DIR set before Python starts)."""
    import numpy as np

    import qaq_gguf
    from qaq_gguf import profile

    if not _has_vulkan_llama():
        pytest.skip("the loaded libllama has no Vulkan backend or no Vulkan device (build with -DGGML_VULKAN=on; "
                    "QAQ_GGUF_LIB_DIR selects another build)")
    model = request.getfixturevalue(model_name)
    ident = profile.model_identity(model)
    ks = [tk if il % 2 else tv for il in range(ident.n_layer)]
    vs = [tv if il % 2 else tk for il in range(ident.n_layer)]
    f = profile.write_profile(profile.make_profile(ident, ks, vs), tmp_path / "mixed.gguf")
    tok = qaq_gguf.Llama(str(model), vocab_only=True, verbose=False).tokenize(eval_text[:3000].encode())[:128]
    cpu, _ = _logits(model, tok, 0, kv_profile=str(f))
    gpu, llm = _logits(model, tok, 99, kv_profile=str(f))
    assert [r["type_k"] for r in llm.kv_layer_info()] == ks
    assert np.abs(cpu - gpu).max() < tol * np.abs(cpu).max()
    assert np.mean(cpu.argmax(1) == gpu.argmax(1)) > 0.97
