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


def _skip(why: str):
    """Skip, naming why; a failure instead where CI built the Vulkan variant and set QAQ_REQUIRE_VULKAN=1."""
    if os.environ.get("QAQ_REQUIRE_VULKAN") == "1":
        pytest.fail(f"QAQ_REQUIRE_VULKAN=1, but: {why}")
    pytest.skip(why)

QAQ_TYPES = ["qaq3", "qaq2", "qaq4l", "qaq3l", "qaq2l", "qaq4h", "qaq3h", "qaq2h", "tcq3", "tcq2"]
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
    # lavapipe compiles a head-256 flash-attention pipeline with LLVM in minutes (upstream's f16 one: 199 s, a qaq3
    # one: 679 s, on the 2-core VM); without LLVM's optimization passes about 3x faster, and the tests' shapes are small
    env.setdefault("GALLIVM_PERF", "nopt")
    return env


def _exe(name: str) -> Path:
    exe = _bin_dir() / name
    if not exe.is_file():
        _skip(f"{name} not found in {_bin_dir()}: build with -DGGML_VULKAN=on -DQAQ_BUILD_TEST_BACKEND_OPS=ON "
                    "(or point QAQ_VULKAN_BIN_DIR at such a build)")
    return exe


@pytest.fixture(scope="module")
def quant_run() -> subprocess.CompletedProcess:
    """qaq-test-backend-quant on Vulkan0, once: it also tells whether there is a Vulkan device at all (exit 77)."""
    exe = _exe("qaq-test-backend-quant")
    r = subprocess.run([str(exe), "Vulkan0", "128"], capture_output=True, text=True, timeout=1800, env=_env())
    if r.returncode == 77:
        _skip(f"no Vulkan device: {r.stdout.strip()[-300:]} (on Debian: apt install mesa-vulkan-drivers; "
                    "a build without -DGGML_VULKAN=on has no Vulkan backend)")
    return r


def test_quantizer_bytes_match_the_c_reference(quant_run):
    """SET_ROWS/CPY into every qaq type writes the C reference's bytes; CPY back to f32 gives its values bit for bit."""
    out = quant_run.stdout + quant_run.stderr
    assert quant_run.returncode == 0, out[-4000:]
    assert "ALL OK" in out
    for t in QAQ_TYPES:
        assert f"{t:<6}  quantize: 0/" in out, out[-4000:]


def _backend_ops(op: str, params: str, timeout: int, **env: str) -> str:
    exe = _exe("test-backend-ops")
    r = subprocess.run([str(exe), "-b", "Vulkan0", "-o", op, "-p", params], capture_output=True, text=True,
                       timeout=timeout, env={**_env(), **env})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "FAIL" not in r.stdout and "not supported" not in r.stdout, out[-4000:]
    m = re.search(r"(\d+)/(\d+) tests passed", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0, out[-4000:]  # some cases ran, all passed
    return out


@pytest.mark.parametrize("family", ["qaq", "tcq"])
@pytest.mark.parametrize("op", ["SET_ROWS", "GET_ROWS", "CPY"])
def test_backend_ops_qaq_types_match_cpu(quant_run, op, family):
    """llama.cpp's test-backend-ops qaq and tcq cases (patches/0009, 0016, 0026, 0034): Vulkan against the CPU
    backend."""
    _backend_ops(op, family, timeout=1800)


# every qaq type with itself, and mixed pairs: qaq beside upstream types (either side) and two qaq types
FA_PAIRS = [(t, t) for t in QAQ_TYPES] + [("f16", "qaq3"), ("q8_0", "qaq2h"), ("qaq4l", "q4_0"), ("qaq3h", "qaq4h"),
                                          ("qaq2", "qaq3l"), ("qaq4h", "f16"), ("q8_0", "tcq3"), ("tcq2", "qaq3h")]


def _fa_params(tk: str, tv: str, heads: str, nr2: str, nb: str, kv: str = "512|113") -> str:
    """A test-backend-ops -p regex for test_flash_attn_ext cases of one K/V pair (patches/0026's qaq grid)."""
    return (rf"hsk=({heads}),hsv=({heads}),nh=2,nr23=\[({nr2}),1\],kv=({kv}),nb=({nb}),mask=1,sinks=0,"
            rf"max_bias=0\.000000,logit_softcap=0\.000000,prec=f32,type_K={tk},type_V={tv},")


def _heads(tk: str, tv: str) -> str:
    return "128" if {tk, tv} & LEAN else "64|128"


@pytest.mark.slow
@pytest.mark.parametrize("tk,tv", FA_PAIRS)
def test_flash_attention_qaq_matches_cpu(quant_run, tk, tv):
    """FLASH_ATTN_EXT on the scalar path with qaq K and/or V against the CPU backend: decode (1 query) and prefill
    (32 queries) at head sizes 64 and 128 (128 beside a lean type: whole blocks of 128), GQA 1 and 4, padded and
    unpadded caches; for a type with itself also GQA 8 and a 512-query prefill. Each new pipeline costs lavapipe
    seconds to minutes to compile, so CI runs this subset of patches/0026's grid; the whole grid:
    `test-backend-ops -b Vulkan0 -o FLASH_ATTN_EXT -p qaq` (docs/cache-types.md). Head 256: below."""
    params = _fa_params(tk, tv, _heads(tk, tv), "1|4", "1|32")
    if tk == tv:
        params = (f"({params})|({_fa_params(tk, tv, _heads(tk, tv), '8', '1', '512')})"
                  f"|({_fa_params(tk, tv, '128', '4', '512', '512')})")
    _backend_ops("FLASH_ATTN_EXT", params, timeout=1800)


@pytest.mark.slow
@pytest.mark.vulkan_head256
@pytest.mark.parametrize("tk,tv", [("qaq2", "qaq2"), ("qaq4l", "qaq3")])
def test_flash_attention_qaq_head_256_matches_cpu(quant_run, tk, tv):
    """Head 256 (Gemma's): decode, GQA 4. Two pairs only, and not in CI: lavapipe compiles each head-256 pipeline
    for minutes (qaq2/qaq2: 17 min from an empty shader cache on the 2-core VM, half of the cold Vulkan stage); run
    by hand with -m vulkan_head256 (both passed, docs/benchmarks.md)."""
    _backend_ops("FLASH_ATTN_EXT", _fa_params(tk, tv, "256", "4", "1", "512"), timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("tk,tv", [(t, t) for t in QAQ_TYPES])
def test_flash_attention_qaq_without_f16_matches_cpu(quant_run, tk, tv):
    """The same with GGML_VK_DISABLE_F16=1 (the shaders' fp32 variants, as on devices without fp16 arithmetic: a
    path where other forks' rotated types broke): decode and prefill at GQA 4, padded cache."""
    _backend_ops("FLASH_ATTN_EXT", _fa_params(tk, tv, _heads(tk, tv), "4", "1|32", "512"), timeout=1800,
                 GGML_VK_DISABLE_F16="1")


def _has_vulkan_llama() -> bool:
    """The loaded libllama (QAQ_GGUF_LIB_DIR or the installed package) has the Vulkan backend and sees a device."""
    from qaq_gguf import _native

    os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
    try:
        import llama_cpp

        llama_cpp.llama_backend_init()
        _, lib = _native.ffi_lib()
        return "Vulkan" in _native.backend_names() and any(
            _native.c_str(lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i))).startswith("Vulkan")
            for i in range(lib.ggml_backend_dev_count()))
    except Exception:
        return False


@pytest.fixture(scope="module")
def vulkan_llama() -> None:
    if not _has_vulkan_llama():
        _skip("the loaded libllama has no Vulkan backend or no Vulkan device (tools/vulkan_build.sh builds one; "
                    "QAQ_GGUF_LIB_DIR selects it before Python starts)")


def test_info_lists_the_vulkan_device_and_its_cache_types(vulkan_llama):
    """`qaq-gguf info` names the Vulkan device and the cache types its flash attention runs, ours included."""
    import json
    import sys

    r = subprocess.run([sys.executable, "-m", "qaq_gguf.cli", "info", "--json"], capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert "Vulkan" in info["backends"]
    vk = [d for d in info["devices"] if d["name"].startswith("Vulkan")]
    assert vk and vk[0]["type"] == "gpu", info["devices"]
    types = vk[0]["kv_cache_types"]
    assert {"f16", "q8_0", "q4_0", "qaq3", "qaq2", "qaq4l", "qaq3l", "qaq2l"} <= set(types["128"]), types
    assert {"qaq4h", "qaq3h", "qaq2h", "qaq3", "qaq2", "tcq3", "tcq2"} <= set(types["64"]), types
    assert "qaq4l" not in types["64"]  # a 128-value block does not fit a 64-value head: not listed
    r = subprocess.run([sys.executable, "-m", "qaq_gguf.cli", "info"], capture_output=True, text=True, env=_env(),
                       timeout=600)
    assert "flash attention, head 64, K = V:" in r.stdout and "qaq3h" in r.stdout, r.stdout


_LOGITS = """
import sys, numpy as np, qaq_gguf
model, prof, n_gpu_layers, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
toks = [int(t) for t in sys.argv[5].split(",")]
llm = qaq_gguf.Llama(model, n_ctx=512, n_batch=512, n_gpu_layers=n_gpu_layers, logits_all=True, verbose=False,
                     flash_attn=True, kv_profile=prof)
llm.eval(toks)
np.save(out, np.array(llm.scores[: len(toks)]))
print("types", ",".join(r["type_k"] + "/" + r["type_v"] + "@" + r["device"] for r in llm.kv_layer_info()))
"""


def _cpu_build(env: dict[str, str]) -> None:
    """Point a child process at the installed package's (CPU-only) build instead of the Vulkan one."""
    env.pop("QAQ_GGUF_LIB_DIR", None)
    env.pop("LLAMA_CPP_LIB_PATH", None)  # set by this process's binding to the Vulkan build


def _logits(model, profile_path, tokens, n_gpu_layers: int, out: Path, vulkan: bool):
    """Logits of a fresh process: on the Vulkan build with every layer offloaded, or on the installed package's
    CPU-only build (no Vulkan device can take work from it: llama.cpp offloads large CPU batches to a GPU present)."""
    import sys

    import numpy as np

    env = _env()
    if not vulkan:
        _cpu_build(env)
    r = subprocess.run([sys.executable, "-c", _LOGITS, str(model), str(profile_path), str(n_gpu_layers), str(out),
                        ",".join(map(str, tokens))], capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out), r.stdout


def _calibrated(model, calib_text_file: Path, out: Path, budget: float, *extra: str) -> Path:
    """A profile calibrated as a user makes one (transforms on), small: 2 chunks of 256 tokens."""
    import sys

    env = _env()
    _cpu_build(env)  # calibration runs on the CPU build
    r = subprocess.run([sys.executable, "-m", "qaq_gguf.cli", "calibrate", str(model), "--text", str(calib_text_file),
                        "--budget", str(budget), "--chunks", "2", "--ctx", "256", "-o", str(out), *extra],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def calib_file(calib_text, tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("vk") / "calib.txt"
    f.write_text(calib_text)
    return f


def _kld(p, q) -> float:
    """Mean KL divergence of softmax(q) from softmax(p) over the rows."""
    import numpy as np

    def lsm(x):
        x = x - x.max(1, keepdims=True)
        return x - np.log(np.exp(x).sum(1, keepdims=True))

    lp, lq = lsm(np.asarray(p, np.float64)), lsm(np.asarray(q, np.float64))
    return float(np.mean((np.exp(lp) * (lp - lq)).sum(1)))


@pytest.mark.slow
@pytest.mark.parametrize("model_name,budget,candidates,n_tok", [
    ("smollm2", 3.5, None, 256),
    ("smollm2", 3.0, "q8_0,qaq4h,tcq3,tcq2", 256),  # the trellis types in most layers
    # head 256: lavapipe compiled Gemma's pipelines (its Q4_K matmuls, head-256 attention) for over 25 minutes on the
    # 2-core VM without finishing: run by hand (-m vulkan_head256) on a faster machine or a real GPU, not in CI
    pytest.param("gemma", 4.0, "q8_0,qaq3,qaq2", 128, marks=pytest.mark.vulkan_head256)])
def test_calibrated_profile_on_vulkan_matches_cpu(vulkan_llama, request, eval_text, calib_file, tmp_path, model_name,
                                                  budget, candidates, n_tok):
    """A real model with a calibrated mixed profile (its types, centred and rebalanced keys, centred values; no exact
    cells, which only the CPU holds), every layer on Vulkan, against the CPU build, each scored against its own
    backend's f16 cache. The two backends' f16 caches already differ a little (weights' matmuls in other precisions),
    and a 3-bit quantizer turns small input differences into other grid points, so logits are not compared token
    by token: the profile must lose the same to f16 on both (KLD within 40%; top-1 within three standard errors of a
    rate over the tokens scored, 7 points at 256 tokens: the SmolLM2 3.0-bit profile solved with keys counted twice
    measured CPU KLD 0.1087 top-1 0.863, Vulkan KLD 0.0968 top-1 0.805 on lavapipe, 2026-12-07)."""
    import numpy as np

    import qaq_gguf
    from qaq_gguf import profile

    from qaq_gguf import calibrate

    model = request.getfixturevalue(model_name)
    if candidates is None:  # the default candidates of this CPU build, less any type Vulkan has no kernels for
        left_out = calibrate.NO_GPU_KERNELS.get("Vulkan", ())
        candidates = ",".join(c for c in calibrate.default_candidates() if c not in left_out)
    f = _calibrated(model, calib_file, tmp_path / "p.gguf", budget, "--exact-cells", "0", "--candidates", candidates)
    p = profile.read_profile(f)
    assert len(set(zip(p.type_k, p.type_v))) > 1 and any(t.startswith(("qaq", "tcq")) for t in p.type_k + p.type_v)
    if "tcq" in candidates:
        assert {"tcq3", "tcq2"} & set(p.type_k + p.type_v), (p.type_k, p.type_v)
    assert p.k_mean is not None and p.v_mean is not None  # the transforms run on Vulkan too
    f16 = profile.write_profile(profile.make_profile(p.model, "f16", "f16"), tmp_path / "f16.gguf")
    tok = qaq_gguf.Llama(str(model), vocab_only=True, verbose=False).tokenize(eval_text[:6000].encode())[:n_tok]
    cpu, _ = _logits(model, f, tok, 0, tmp_path / "cpu.npy", vulkan=False)
    cpu16, _ = _logits(model, f16, tok, 0, tmp_path / "cpu16.npy", vulkan=False)
    vk, types = _logits(model, f, tok, 99, tmp_path / "vk.npy", vulkan=True)
    vk16, _ = _logits(model, f16, tok, 99, tmp_path / "vk16.npy", vulkan=True)
    assert "Vulkan" in types, types
    base = _kld(cpu16, vk16)
    k_cpu, k_vk = _kld(cpu16, cpu), _kld(vk16, vk)
    top_cpu, top_vk = np.mean(cpu.argmax(1) == cpu16.argmax(1)), np.mean(vk.argmax(1) == vk16.argmax(1))
    print(f"{model_name} {budget}: f16 CPU vs Vulkan KLD {base:.4f}, greedy {np.mean(cpu16.argmax(1) == vk16.argmax(1)):.3f}; "
          f"profile vs own f16: CPU KLD {k_cpu:.4f} top-1 {top_cpu:.3f}, Vulkan KLD {k_vk:.4f} top-1 {top_vk:.3f}; "
          f"profile CPU vs Vulkan greedy {np.mean(cpu.argmax(1) == vk.argmax(1)):.3f}")
    assert base < 0.02  # the backends agree with the f16 cache
    assert k_cpu / 1.4 <= k_vk <= k_cpu * 1.4
    assert top_vk >= top_cpu - max(0.05, 3 * np.sqrt(top_cpu * (1 - top_cpu) / len(cpu)))


@pytest.mark.parametrize("tk,tv", [("bf16", "qaq3")])
def test_profile_without_a_vulkan_kernel_is_refused_by_name(vulkan_llama, gemma, tmp_path, tk, tv):
    """A pair the Vulkan flash attention has no kernel for (bf16 keys with qaq3 values) is refused, naming the pair
    and the device, never run on another device or converted silently."""
    import qaq_gguf
    from qaq_gguf import profile

    ident = profile.model_identity(gemma)
    f = profile.write_profile(profile.make_profile(ident, tk, tv), tmp_path / f"{tk}-{tv}.gguf")
    with pytest.raises(Exception) as e:
        qaq_gguf.Llama(str(gemma), n_ctx=256, n_gpu_layers=99, flash_attn=True, kv_profile=str(f), verbose=False)
    msg = str(e.value)
    assert f"{tk}/{tv}" in msg and "Vulkan0" in msg and "flash-attention kernel" in msg, msg


def test_exact_cells_on_vulkan_are_refused_by_name(vulkan_llama, smollm2, tmp_path):
    """Exact cells live only in the CPU's flash attention: a profile with them and a KV layer on Vulkan is refused."""
    import qaq_gguf
    from qaq_gguf import profile

    ident = profile.model_identity(smollm2)
    p = profile.make_profile(ident, "qaq3h", "qaq3h")
    p.exact_cells = 1
    f = profile.write_profile(p, tmp_path / "x.gguf")
    with pytest.raises(Exception) as e:
        qaq_gguf.Llama(str(smollm2), n_ctx=256, n_gpu_layers=99, flash_attn=True, kv_profile=str(f), verbose=False)
    assert "exact" in str(e.value) and "Vulkan0" in str(e.value), str(e.value)
