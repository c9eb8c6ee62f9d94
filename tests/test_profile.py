"""Issue 3: per-layer K/V cache types from a profile, in Python and llama-server, and every bad input."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from qaq_gguf import Llama, ProfileError, _native, evaluate, llama, profile, runtime


def _logits(llm: Llama, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def _tokens(llm: Llama, text: str, n: int) -> list[int]:
    toks = llm.tokenize(text.encode(), add_bos=True)
    assert len(toks) >= n
    return toks[:n]


@pytest.fixture(scope="module")
def mixed(gemma, gemma_ident, tmp_path_factory) -> tuple[Path, profile.Profile]:
    n = gemma_ident.n_layer
    tk = ["f16" if il % 3 == 0 else "q8_0" if il % 3 == 1 else "q4_0" for il in range(n)]
    tv = ["q8_0" if il % 2 == 0 else "q4_0" for il in range(n)]
    p = profile.make_profile(gemma_ident, tk, tv, {"method": "test"})
    path = profile.write_profile(p, tmp_path_factory.mktemp("prof") / "mixed.gguf")
    return path, p


def test_fingerprint_python_matches_native(gemma, tiny_model):
    ffi, lib = _native.ffi_lib()
    for m in (gemma, tiny_model):
        out = ffi.new("char[65]")
        err = ffi.new("char[256]")
        assert lib.qaq_model_fingerprint(str(m).encode(), out, err, 256) == 0
        assert ffi.string(out).decode() == profile.fingerprint(m)
    assert profile.fingerprint(gemma) != profile.fingerprint(tiny_model)


def test_identity_of_gemma(gemma_ident):
    g = gemma_ident
    assert g.architecture == "gemma3" and g.n_layer == 18
    assert set(g.head_dim_k) == {256} and set(g.n_head_kv) == {1}
    assert [il for il in range(18) if not g.is_swa[il]] == [5, 11, 17] and g.n_swa == 512


@pytest.mark.parametrize("t", ["f16", "q8_0", "q4_0", "qaq3", "qaq2"])
def test_uniform_profile_gives_identical_logits(gemma, gemma_ident, eval_text, tmp_path, t):
    p = profile.write_profile(profile.make_profile(gemma_ident, t, t), tmp_path / f"{t}.gguf")
    kw = dict(n_ctx=256, n_batch=64, verbose=False, flash_attn=True, logits_all=True)
    ref = Llama(str(gemma), type_k=runtime_type(t), type_v=runtime_type(t), **kw)
    toks = _tokens(ref, eval_text, 96)
    a = _logits(ref, toks)
    del ref
    llm = Llama(str(gemma), kv_profile=str(p), **kw)
    assert {(r["type_k"], r["type_v"]) for r in llm.kv_layer_info()} == {(t, t)}
    b = _logits(llm, toks)
    assert np.array_equal(a, b)


def runtime_type(name: str) -> int:
    from qaq_gguf import cachetypes

    return cachetypes.get(name).type_id


def _continuation(llm: Llama, toks: list[int], shift: bool) -> np.ndarray:
    """Logits of toks[150:200] after toks[:150], with tokens 1..50 dropped either by a K-shift of the cache
    (shift=True) or by never decoding them (a fresh run over the same remaining tokens)."""
    import llama_cpp

    kept = toks[:1] + toks[51:150]
    if not shift:
        return _logits(llm, kept + toks[150:200])[100:150]
    llm.reset()
    llm.eval(toks[:150])
    mem = llama_cpp.llama_get_memory(llm.ctx)
    assert llama_cpp.llama_memory_seq_rm(mem, 0, 1, 51)  # keep BOS, drop 50 tokens
    llama_cpp.llama_memory_seq_add(mem, 0, 51, -1, -50)  # move the rest back: re-rope K in place
    llm.n_tokens = 100
    llm.input_ids[:100] = kept
    llm.eval(toks[150:200])
    return np.array(llm.scores[100:150], dtype=np.float32)


def shift_agreement(ref: Llama, llm: Llama, toks: list[int]) -> dict[bool, float]:
    """Greedy agreement of llm with ref (an f16 cache) on the continuation, without (False) and after (True) a K-shift
    of both caches (_continuation); llm's logits must stay finite."""
    agree = {}
    for shift in (False, True):
        a, b = _continuation(ref, toks, shift), _continuation(llm, toks, shift)
        assert np.all(np.isfinite(b))
        agree[shift] = float(np.mean(a.argmax(1) == b.argmax(1)))
    return agree


@pytest.mark.parametrize("tk", ["q4_0", "qaq3"])
def test_context_shift_of_a_quantized_k_cache(gemma, gemma_ident, eval_text, tmp_path, tk):
    """A K-shift reads the quantized, Hadamard-rotated K cache as f32, re-ropes it and writes it back in its type.
    Against the f16 cache doing the same, a shifted quantized cache must agree about as well as it does without
    the shift (a wrong rotation or a broken copy would make the continuation noise)."""
    kw = dict(n_ctx=256, n_batch=64, verbose=False, flash_attn=True, logits_all=True)
    p = profile.write_profile(profile.make_profile(gemma_ident, tk, "f16"), tmp_path / "k.gguf")
    ref, llm = Llama(str(gemma), **kw), Llama(str(gemma), kv_profile=str(p), **kw)
    agree = shift_agreement(ref, llm, _tokens(ref, eval_text, 200))
    assert agree[True] >= agree[False] - 0.15, agree


def test_mixed_profile_allocates_each_layer(gemma, mixed):
    path, p = mixed
    n_ctx = 1024
    llm = Llama(str(gemma), kv_profile=str(path), n_ctx=n_ctx, verbose=False, swa_full=False)
    info = {r["layer"]: r for r in llm.kv_layer_info()}
    assert sorted(info) == list(range(18))
    for il in range(18):
        assert (info[il]["type_k"], info[il]["type_v"]) == (p.type_k[il], p.type_v[il])
        nk, nv = profile.layer_values(p.model, il, n_ctx)
        assert info[il]["n_cells"] == profile.layer_cells(p.model, il, n_ctx)
        from qaq_gguf import cachetypes

        assert info[il]["bytes_k"] == cachetypes.row_bytes(p.type_k[il], nk)
        assert info[il]["bytes_v"] == cachetypes.row_bytes(p.type_v[il], nv)
    assert sum(r["bytes_k"] + r["bytes_v"] for r in info.values()) == profile.kv_bytes(p, n_ctx)


def _perplexity(gemma, text_file: Path, extra: list[str]) -> float:
    exe = _native.bin_dir() / "llama-perplexity"
    r = subprocess.run([str(exe), "-m", str(gemma), "-f", str(text_file), "-c", "256", "-b", "256", "--chunks", "4",
                        "-t", "2", "-fa", "on", *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import re

    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    assert m, (r.stdout + r.stderr)[-2000:]
    return float(m.group(1))


def test_uniform_profile_is_the_uniform_cache_in_llama_perplexity(gemma, gemma_ident, eval_text, tmp_path):
    """--kv-profile with the same type on every layer is bit-for-bit -ctk/-ctv: same PPL to the last digit."""
    text = tmp_path / "eval.txt"
    text.write_text(eval_text)
    prof = profile.write_profile(profile.make_profile(gemma_ident, "q4_0", "q8_0"), tmp_path / "u.gguf")
    uniform = _perplexity(gemma, text, ["-ctk", "q4_0", "-ctv", "q8_0"])
    assert _perplexity(gemma, text, ["--kv-profile", str(prof)]) == uniform
    assert _perplexity(gemma, text, ["-ctk", "q8_0", "-ctv", "q8_0"]) != uniform


def test_mixed_profile_error_between_uniform_extremes(gemma, gemma_ident, eval_text, tmp_path):
    """KL-divergence against f16, not PPL: on Gemma PPL moves the wrong way for small cache errors (a q4_0-key
    profile scores PPL 25.6 against 24.8 for uniform q4_0 with a *lower* KLD). Values add up across layers, so
    q4_0 values on half the layers must land between q8_0 and q4_0 values everywhere (measured 0.0083 / 0.0120 /
    0.0155 on 4 x 256 wiki tokens)."""
    tv = ["q4_0" if il % 2 else "q8_0" for il in range(gemma_ident.n_layer)]
    prof = profile.write_profile(profile.make_profile(gemma_ident, "q8_0", tv), tmp_path / "half.gguf")
    cfgs = [evaluate.CacheConfig("hi", type_k="q8_0", type_v="q8_0"), evaluate.CacheConfig("mid", profile=str(prof)),
            evaluate.CacheConfig("lo", type_k="q8_0", type_v="q4_0")]
    res = evaluate.evaluate(gemma, eval_text, cfgs, n_ctx=256, n_chunks=4, n_threads=2, progress=False)
    kld = {r["label"]: r["kld"] for r in res["results"]}
    assert kld["hi"] < kld["mid"] < kld["lo"], kld
    assert res["results"][1]["kv_bytes"] < res["results"][0]["kv_bytes"]


def state_round_trip(llm: Llama, *, add_bos: bool, overwrite: bytes = b"") -> tuple:
    """(state, first, again): the next-token logits after a continuation, before and after restoring the state saved
    before it (with other tokens decoded in between when overwrite is given). The model must be made with
    logits_all=True: llama-cpp-python's eval keeps no logits otherwise, and the rows compared would be memory eval
    never wrote (checked: the logits must be real)."""
    toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. Once upon a time", add_bos=add_bos)
    llm.eval(toks)
    state = llm.save_state()
    cont = llm.tokenize(b" there was a king", add_bos=False)
    llm.eval(cont)
    first = np.array(llm.scores[llm.n_tokens - 1])
    if overwrite:
        llm.reset()
        llm.eval(llm.tokenize(overwrite, add_bos=add_bos))
    llm.load_state(state)
    assert llm.n_tokens == len(toks)
    llm.eval(cont)
    again = np.array(llm.scores[llm.n_tokens - 1])
    assert np.ptp(first) > 1.0  # real logits, not a row eval never wrote
    return state, first, again


def test_state_round_trip_and_mismatch(gemma, gemma_ident, mixed, tmp_path):
    path, _ = mixed
    kw = dict(n_ctx=256, verbose=False, flash_attn=True, logits_all=True)  # eval keeps logits only with logits_all
    llm = Llama(str(gemma), kv_profile=str(path), **kw)
    state, first, again = state_round_trip(llm, add_bos=True)
    assert np.array_equal(first, again)

    other = profile.write_profile(profile.make_profile(gemma_ident, "q8_0", "q8_0"), tmp_path / "other.gguf")
    llm2 = Llama(str(gemma), kv_profile=str(other), **kw)
    with pytest.raises(RuntimeError):
        llm2.load_state(state)


def test_server_with_profile_reports_types(gemma, mixed, server_factory):
    path, p = mixed
    s = server_factory(["-m", str(gemma), "-c", "512", "-t", "2", "-np", "1", "--kv-profile", str(path)])
    s.wait_ready()
    res = s.post("/completion", {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0})
    assert res["content"].strip()
    props = s.get("/props")[2]
    layers = props["kv_cache"]["layers"]
    assert props["kv_cache"]["profile"] == str(path)
    assert [(r["type_k"], r["type_v"]) for r in layers] == list(zip(p.type_k, p.type_v))


def test_server_refuses_profile_with_ctk(gemma, mixed, tmp_path):
    path, _ = mixed
    exe = _native.bin_dir() / "llama-server"
    r = subprocess.run([str(exe), "-m", str(gemma), "--kv-profile", str(path), "-ctk", "q4_0", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--kv-profile sets the cache type of every layer; remove -ctk/-ctv" in r.stdout + r.stderr


def test_embedded_profile(gemma, mixed, tmp_path):
    path, p = mixed
    out = profile.embed_profile(gemma, profile.read_profile(path), tmp_path / "gemma-qaq.gguf")
    assert profile.fingerprint(out) == profile.fingerprint(gemma)
    llm = Llama(str(out), kv_profile="embedded", n_ctx=256, verbose=False)
    assert [r["type_k"] for r in llm.kv_layer_info()] == p.type_k
    with pytest.raises(ProfileError, match="has no embedded qaq profile"):
        Llama(str(gemma), kv_profile="embedded", n_ctx=256, verbose=False)


def test_inspect_counts_sliding_window_layers(gemma_ident):
    p = profile.make_profile(gemma_ident, "q8_0", "q4_0")
    assert p.model.n_swa == 512
    # at 32k, 15 SWA layers hold PAD(512 + 512, 256) = 1024 cells, 3 global layers 32768
    vals = 256 * 1  # head_dim * n_head_kv
    expect = (15 * 1024 + 3 * 32768) * vals * (34 + 18) // 32
    assert profile.kv_bytes(p, 32768) == expect
    assert profile.average_bits(p) == pytest.approx((8.5 + 4.5) / 2)
    text = profile.describe(p, n_ctx=32768)
    assert "bits per value: 6.500" in text and text.count("bits per value") == 1  # one bits figure per profile


# --- bad input: each a named error, nothing crashes -------------------------------------------------------

def _edit(src: Path, dst: Path, **changes) -> Path:
    """Rewrite a profile with some fields changed (the way a hand edit or a bug would)."""
    p = profile.read_profile(src)
    for k, v in changes.items():
        if hasattr(p.model, k):
            setattr(p.model, k, v)
        else:
            setattr(p, k, v)
    return profile.write_profile(p, dst)


def test_profile_for_another_model(gemma, tiny_model, tmp_path):
    tiny = profile.model_identity(tiny_model)
    path = profile.write_profile(profile.make_profile(tiny, "q8_0", "q8_0"), tmp_path / "tiny.gguf")
    with pytest.raises(ProfileError, match="qaq.model.architecture is 'llama', but this model is gemma3: the profile belongs to another model"):
        Llama(str(gemma), kv_profile=str(path), n_ctx=256, verbose=False)


def test_wrong_layer_count(gemma, mixed, tmp_path):
    bad = _edit(mixed[0], tmp_path / "bad.gguf", n_layer=17, n_head_kv=[1] * 17, head_dim_k=[256] * 17,
                head_dim_v=[256] * 17, is_swa=[True] * 17, type_k=["q8_0"] * 17, type_v=["q8_0"] * 17)
    with pytest.raises(ProfileError, match="has 17 layers, but this model has 18"):
        Llama(str(gemma), kv_profile=str(bad), n_ctx=256, verbose=False)


def test_other_weights_same_shape(gemma, mixed, tmp_path):
    bad = _edit(mixed[0], tmp_path / "bad.gguf", fingerprint="0" * 64)
    with pytest.raises(ProfileError, match="recalibrate for this file"):
        Llama(str(gemma), kv_profile=str(bad), n_ctx=256, verbose=False)


def test_unknown_type(gemma, mixed, tmp_path):
    bad = _edit(mixed[0], tmp_path / "bad.gguf", type_k=["q3_x"] * 18, type_v=["f16"] * 18)
    with pytest.raises(ProfileError, match=r"layer 0: 'q3_x' is not a KV cache type \(K cache; the cache types are: f32, f16"):
        Llama(str(gemma), kv_profile=str(bad), n_ctx=256, verbose=False)
    with pytest.raises(ProfileError, match="unknown KV cache type 'q3_x'"):
        profile.make_profile(profile.read_profile(mixed[0]).model, "q3_x", "f16")


def test_type_not_usable_for_head_size(tmp_path):
    from conftest import write_synthetic_model

    m = write_synthetic_model(tmp_path / "h48.gguf", n_embd=192, n_head=4, n_head_kv=2)  # head size 48
    ident = profile.model_identity(m)
    assert ident.head_dim_k == [48, 48]
    with pytest.raises(ProfileError, match="blocks of 32 values, which do not divide the head size 48"):
        profile.make_profile(ident, "q4_0", "f16")
    good = profile.make_profile(ident, "f16", "f16")
    good.type_k = ["q4_0", "q4_0"]
    path = profile.write_profile(good, tmp_path / "p.gguf")
    with llama.vocab_only_model(m) as (model, _, _):
        with pytest.raises(ProfileError, match="do not divide this layer's head size 48"):
            runtime.apply_profile(llama.as_ctypes_model(model), m, path)


@pytest.mark.parametrize("cut", [0, 10, 200, -40])
def test_corrupt_or_truncated_file(gemma, mixed, tmp_path, cut):
    data = mixed[0].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut] if cut > 0 else data[:cut] if cut < 0 else b"")
    with pytest.raises(ProfileError, match="cannot read|truncated|missing key"):
        Llama(str(gemma), kv_profile=str(bad), n_ctx=256, verbose=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ProfileError):
        Llama(str(gemma), kv_profile=str(junk), n_ctx=256, verbose=False)


def test_gguf_that_is_not_a_profile(gemma, tiny_model):
    with pytest.raises(ProfileError, match="not a qaq KV profile|holds no qaq KV profile"):
        Llama(str(gemma), kv_profile=str(tiny_model), n_ctx=256, verbose=False)


def test_quantized_v_without_flash_attention(gemma, mixed):
    with pytest.raises(ProfileError, match="only with flash attention; pass flash_attn=True"):
        Llama(str(gemma), kv_profile=str(mixed[0]), n_ctx=256, verbose=False, flash_attn=False)


def test_type_k_with_profile_is_an_error(gemma, mixed):
    with pytest.raises(ProfileError, match="drop type_k="):
        Llama(str(gemma), kv_profile=str(mixed[0]), type_k=8, n_ctx=256, verbose=False)


def test_missing_profile_file(gemma, tmp_path):
    with pytest.raises(ProfileError, match="profile file not found"):
        Llama(str(gemma), kv_profile=str(tmp_path / "nope.gguf"), n_ctx=256, verbose=False)
