"""A profile embedded in the model file is used wherever our libllama loads the model (patches/0017): plain
llama_cpp.Llama, llama-perplexity, any C app. kv_profile=None / --kv-profile none / QAQ_KV_PROFILE=none turn it
off; QAQ_KV_PROFILE=PATH applies that profile to the model it was made for; an invalid embedded profile is refused
with its reason; explicit -ctk/-ctv (type_k/type_v) win over it with a warning."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qaq_gguf import Llama, ProfileError, _native, profile


@pytest.fixture(scope="module")
def embedded(tiny_model, tmp_path_factory) -> tuple[Path, Path, profile.Profile]:
    """(model with an embedded profile, the profile file, the profile): quantized V so that flash attention is
    needed, and transforms so that they travel too."""
    ident = profile.model_identity(tiny_model)
    p = profile.make_profile(ident, ["q8_0", "q4_0"], ["q4_0", "qaq3"], {"method": "test"})
    p.k_scale = np.ones(ident.n_key_mean(), np.float32)
    d = tmp_path_factory.mktemp("emb")
    f = profile.write_profile(p, d / "p.gguf")
    out = profile.embed_profile(tiny_model, p, d / "tiny-qaq.gguf")
    return out, f, p


_CHILD = """
import json, sys, os
import llama_cpp                              # plain llama-cpp-python: no qaq_gguf import, no kv_profile
from qaq_gguf import runtime
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False, **json.loads(sys.argv[2]))
print(json.dumps([r["type_k"] + "/" + r["type_v"] for r in runtime.kv_layer_info(llm)]))
"""


def _plain(model: Path, env: dict | None = None, **kw) -> tuple[list[str] | None, str]:
    e = dict(os.environ, **(env or {}))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(model), json.dumps(kw)], capture_output=True, text=True,
                       env=e, timeout=120)
    return (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None), r.stderr


def test_plain_llama_cpp_uses_the_embedded_profile(embedded):
    model, _, p = embedded
    types, err = _plain(model)
    assert types == [f"{k}/{v}" for k, v in zip(p.type_k, p.type_v)], err


def test_qaq_kv_profile_none_turns_it_off(embedded):
    model, _, _ = embedded
    types, err = _plain(model, {"QAQ_KV_PROFILE": "none"})
    assert types == ["f16/f16", "f16/f16"], err
    llm = Llama(str(model), kv_profile=None, n_ctx=64, verbose=False)
    assert {r["type_k"] for r in llm.kv_layer_info()} == {"f16"}
    llm = Llama(str(model), n_ctx=64, verbose=False)  # the default is the file's own profile
    assert [r["type_v"] for r in llm.kv_layer_info()] == ["q4_0", "qaq3"]


def test_qaq_kv_profile_names_a_file_for_its_model(tiny_model, embedded, tmp_path):
    _, f, p = embedded
    types, err = _plain(tiny_model, {"QAQ_KV_PROFILE": str(f)})
    assert types == [f"{k}/{v}" for k, v in zip(p.type_k, p.type_v)], err
    # another model (its own shapes) is left alone, and the log says so
    from conftest import write_synthetic_model

    other = write_synthetic_model(tmp_path / "other.gguf", seed=3, n_embd=128)
    types, err = _plain(other, {"QAQ_KV_PROFILE": str(f)})
    assert types == ["f16/f16", "f16/f16"], err


def test_explicit_cache_types_win_with_a_warning(embedded):
    model, _, _ = embedded
    r = subprocess.run([sys.executable, "-c", _CHILD.replace("verbose=False", "verbose=True"), str(model),
                        json.dumps({"type_k": 8, "type_v": 8, "flash_attn": True})], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["q8_0/q8_0", "q8_0/q8_0"]
    assert "the KV profile embedded in the model is not used" in r.stderr


def test_the_notices_say_where_the_profile_came_from(tiny_model, embedded):
    """A profile named by QAQ_KV_PROFILE is announced as that file, not as one embedded in the model."""
    _, f, _ = embedded
    code = _CHILD.replace("verbose=False", "verbose=True")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_model),
                        json.dumps({"type_k": 8, "type_v": 8, "flash_attn": True})], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, QAQ_KV_PROFILE=str(f)))
    assert r.returncode == 0, r.stderr
    assert f"KV cache profile from QAQ_KV_PROFILE={f} applied to {tiny_model}" in r.stderr
    assert f"the KV profile from QAQ_KV_PROFILE={f} is not used" in r.stderr
    assert "embedded in the model" not in r.stderr


def test_invalid_embedded_profile_is_refused_with_its_reason(tiny_model, embedded, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import fuzz_corpus

    model, _, _ = embedded
    data = model.read_bytes()
    fields, _ = fuzz_corpus.parse(data)
    f = next(x for x in fields if x.key == "qaq.kv.type_k")
    bad = tmp_path / "bad.gguf"
    # q4_K (a weight type, not a cache type) has as many bytes as q8_0: the model's tensor data stays in place
    bad.write_bytes(fuzz_corpus._replace_value(data, f, fuzz_corpus.ARRAY, fuzz_corpus._str_array(["q4_K", "q4_0"])))
    # plain llama-cpp-python: the load fails, and llama.cpp's log says why (verbose=False hides llama.cpp's log)
    r = subprocess.run([sys.executable, "-c", _CHILD.replace("verbose=False", "verbose=True"), str(bad), "{}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "'q4_K' is not a KV cache type" in r.stderr, r.stderr[-1500:]
    with pytest.raises(ProfileError, match="'q4_K' is not a KV cache type"):
        Llama(str(bad), n_ctx=64, verbose=False)
    # a plain model load of it fails too (llama-perplexity, llama-server: the same load), and the reason is printed
    # every time: the tool returns right after the error, and the log's worker thread must drain first (patch 0018;
    # without it most of these runs printed nothing on a loaded machine)
    exe = _native.bin_dir() / "llama-perplexity"
    for _ in range(10):
        r = subprocess.run([str(exe), "-m", str(bad), "-f", "/dev/null"], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "'q4_K' is not a KV cache type" in r.stdout + r.stderr, r.stdout + r.stderr
    # and QAQ_KV_PROFILE=none is the way out
    types, err = _plain(bad, {"QAQ_KV_PROFILE": "none"})
    assert types == ["f16/f16", "f16/f16"], err


def test_memory_estimate_counts_the_profile(gemma, tmp_path):
    """llama.cpp's memory planning (-fit, llama-fit-params) builds its own temporary model: it applies the profile
    too, so the estimated context memory shrinks by what the profile saves."""
    ident = profile.model_identity(gemma)
    p = profile.write_profile(profile.make_profile(ident, "qaq2", "qaq2"), tmp_path / "q2.gguf")
    exe = _native.bin_dir() / "llama-fit-params"

    def context_mib(*extra):
        r = subprocess.run([str(exe), "-m", str(gemma), "-c", "32768", "-fitp", "on", *extra], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        host = [line.split() for line in r.stdout.splitlines() if line.startswith("Host ")]
        return int(host[-1][2])  # Host <model> <context> <compute> MiB

    f16, q2 = context_mib(), context_mib("--kv-profile", str(p))
    kv_f16 = profile.kv_bytes(profile.make_profile(ident, "f16", "f16"), 32768) / 2**20
    kv_q2 = profile.kv_bytes(profile.read_profile(p), 32768) / 2**20
    assert abs((f16 - q2) - (kv_f16 - kv_q2)) <= 2, (f16, q2, kv_f16, kv_q2)
