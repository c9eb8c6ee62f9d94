"""The profile's K/V transforms in llama.cpp (patches/0011): rebalanced keys (qaq.kv.k_scale), centred values
(qaq.kv.v_mean) and the exact first token (centring vectors that put BOS on the grid), on Gemma 3 270M.

Each transform is exact for attention: identity transforms change nothing at all, and on an f16 cache only the
rounding of what is stored changes; on a quantized cache they cut the error."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from qaq_gguf import Llama, ProfileError, calibrate, collect, evaluate, profile, rope, transforms


@pytest.fixture(scope="module")
def stats(gemma, gemma_ident, calib_text) -> calibrate.Scores:
    """Transform statistics of Gemma 3 270M from one calibration chunk (as calibrate() gathers them), in a Scores
    with no type scores (centring_for only needs the statistics)."""
    ident = gemma_ident
    chunk = next(collect.iter_chunks(gemma, calib_text, n_ctx=512, n_chunks=1, n_threads=2))
    parts = {k: [] for k in ("k_mean", "k_scale", "v_mean", "k_first", "v_first")}
    for il in range(ident.n_layer):
        if il not in chunk:
            for k in parts:
                parts[k].append(np.zeros(ident.n_embd_v(il) if k.startswith("v") else ident.n_embd_k(il)))
            continue
        a = chunk[il]
        m = calibrate._Moments()
        m.add(a, skip_first=True)
        partner = rope.pair_partner(ident.head_dim_k[il], ident.n_rot, ident.rope_neox)
        for k, val in (("k_mean", m.k_mean()), ("k_scale", m.scales(partner)), ("v_mean", m.v_mean()),
                       ("k_first", a.k[0]), ("v_first", a.v[0])):
            parts[k].append(np.asarray(val, np.float32).ravel())
    flat = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    z = np.zeros((ident.n_layer, 1))
    return calibrate.Scores(ident, ["f16"], z, z, {}, **flat)


def _write(ident, tk, tv, path, k_mean=None, k_scale=None, v_mean=None):
    p = profile.make_profile(ident, tk, tv)
    p.k_mean, p.k_scale, p.v_mean = k_mean, k_scale, v_mean
    return str(profile.write_profile(p, path))


def _transformed(stats, tk, tv, path, *, first=True):
    s = stats if first else calibrate.Scores(stats.ident, stats.candidates, stats.k, stats.v, {},
                                             k_mean=stats.k_mean, k_scale=stats.k_scale, v_mean=stats.v_mean)
    n = stats.ident.n_layer
    k_mean, k_scale, v_mean = calibrate.centring_for(s, [tk] * n, [tv] * n)
    return _write(stats.ident, tk, tv, path, k_mean, k_scale, v_mean)


def test_identity_transforms_change_nothing(gemma, gemma_ident, eval_text, tmp_path):
    """Scales of one, zero means: the graph multiplies by 1 and adds 0, so the logits are bit-identical."""
    nk, nv = gemma_ident.n_key_mean(), gemma_ident.n_value_mean()
    plain = _write(gemma_ident, "q4_0", "q4_0", tmp_path / "p.gguf")
    ident = _write(gemma_ident, "q4_0", "q4_0", tmp_path / "i.gguf", np.zeros(nk, np.float32),
                   np.ones(nk, np.float32), np.zeros(nv, np.float32))
    assert profile.read_profile(ident).schema_version() == 2
    kw = dict(n_ctx=256, n_batch=128, verbose=False, flash_attn=True, logits_all=True)
    out = []
    for f in (plain, ident):
        llm = Llama(str(gemma), kv_profile=f, **kw)
        toks = llm.tokenize(eval_text.encode(), add_bos=True)[:160]
        llm.eval(toks)
        out.append(np.array(llm.scores[:len(toks)]))
    np.testing.assert_array_equal(out[0], out[1])


def test_transforms_leave_an_f16_cache_unchanged(gemma, stats, eval_text, tmp_path):
    """On an f16 cache only the rounding of the stored keys and values changes: Gemma 3 270M turns any such
    perturbation into KL-divergence ~0.0065 (test_centring.py), far below what a wrong transform costs."""
    cfg = [evaluate.CacheConfig("transformed", profile=_transformed(stats, "f16", "f16", tmp_path / "t.gguf"))]
    res = evaluate.evaluate(gemma, eval_text, cfg, n_ctx=512, n_chunks=2, n_threads=2, progress=False)
    assert res["results"][0]["kld"] < 0.0085, res["results"][0]


@pytest.mark.parametrize("tk,tv", [("q4_0", "q4_0"), ("qaq3", "qaq3")])
def test_transforms_cut_the_error(gemma, gemma_ident, stats, eval_text, tmp_path, tk, tv):
    """Same types, same tokens: centred keys alone < centred + rebalanced + exact first token."""
    centred = _write(gemma_ident, tk, tv, tmp_path / "c.gguf", stats.k_mean)
    full = _transformed(stats, tk, tv, tmp_path / "t.gguf")
    res = evaluate.evaluate(gemma, eval_text, [evaluate.CacheConfig("centred", profile=centred),
                                               evaluate.CacheConfig("full", profile=full)],
                            n_ctx=512, n_chunks=2, n_threads=2, progress=False)
    kld = {r["label"]: r["kld"] for r in res["results"]}
    assert kld["full"] < 0.7 * kld["centred"], kld


def test_first_token_is_stored_exactly(stats):
    """The centring vectors put BOS's stored K and V rows on each type's grid (numpy, the runtime's arithmetic)."""
    from qaq_gguf import scoring

    ident = stats.ident
    n = ident.n_layer
    for t in ("q4_0", "qaq3", "qaq2"):
        k_mean, k_scale, v_mean = calibrate.centring_for(stats, [t] * n, [t] * n)
        o = 0
        for il in range(n):
            nk = ident.n_embd_k(il)
            shape = (ident.n_head_kv[il], ident.head_dim_k[il])
            stored = ((stats.k_first[o:o + nk] - k_mean[o:o + nk]) * k_scale[o:o + nk]).reshape(shape)
            back = scoring.quant_roundtrip(stored[None], t)[0]
            np.testing.assert_allclose(back, stored, rtol=1e-4, atol=1e-4 * np.abs(stored).max())
            o += nk


def test_transformed_profile_survives_a_context_shift(gemma, stats, eval_text, tmp_path):
    """K-shift un-rotates, adds the scaled mean back, applies RoPE (which commutes with per-pair scales) and
    stores again: the continuation after a shift agrees with the centred-only profile's as well."""
    from test_profile import _continuation

    kw = dict(n_ctx=256, n_batch=64, verbose=False, flash_attn=True, logits_all=True)
    ref = Llama(str(gemma), **kw)
    toks = ref.tokenize(eval_text.encode(), add_bos=True)[:200]
    agree = {}
    for name, f in (("centred", _write(stats.ident, "qaq3", "f16", tmp_path / "c.gguf", stats.k_mean)),
                    ("full", _transformed(stats, "qaq3", "f16", tmp_path / "t.gguf"))):
        llm = Llama(str(gemma), kv_profile=f, **kw)
        a, b = _continuation(ref, toks, True), _continuation(llm, toks, True)
        fresh = _continuation(llm, toks, False)
        agree[name] = (np.mean(a.argmax(1) == b.argmax(1)), np.mean(fresh.argmax(1) == b.argmax(1)))
    assert agree["full"][0] >= agree["centred"][0] - 0.1, agree
    assert agree["full"][1] >= 0.6, agree


def test_state_round_trip_and_transform_mismatch(gemma, stats, tmp_path):
    """A saved state restores into a context with the same transforms, and is refused (not misread) by one that
    stores K and V differently."""
    import llama_cpp

    full = _transformed(stats, "q4_0", "q4_0", tmp_path / "t.gguf")
    plain = _write(stats.ident, "q4_0", "q4_0", tmp_path / "p.gguf")
    kw = dict(n_ctx=256, n_batch=64, verbose=False, flash_attn=True, logits_all=True)  # eval keeps logits only so
    a = Llama(str(gemma), kv_profile=full, **kw)
    toks = a.tokenize(b"The quick brown fox jumps over the lazy dog", add_bos=True)
    a.eval(toks)
    n = llama_cpp.llama_state_get_size(a.ctx)
    buf = (ctypes.c_uint8 * n)()
    n = llama_cpp.llama_state_get_data(a.ctx, buf, n)
    logits_a = np.array(a.scores[len(toks) - 1])

    same = Llama(str(gemma), kv_profile=full, **kw)
    assert llama_cpp.llama_state_set_data(same.ctx, buf, n) == n
    other = Llama(str(gemma), kv_profile=plain, **kw)
    assert llama_cpp.llama_state_set_data(other.ctx, buf, n) == 0
    # the restored cache continues like the original
    for llm in (a, same):
        llm.n_tokens = len(toks)
        llm.input_ids[:len(toks)] = toks
    a.eval([toks[-1]])
    same.eval([toks[-1]])
    assert np.isfinite(logits_a).all() and np.ptp(logits_a) > 1.0  # real logits, not a row eval never wrote
    np.testing.assert_allclose(np.array(a.scores[len(toks)]), np.array(same.scores[len(toks)]), atol=1e-4)


def _rewrite(src, dst, replace: dict) -> str:
    """A copy of a profile file with some keys' values replaced, as a hand-edited file would have them."""
    from conftest import rewrite_profile

    return str(rewrite_profile(src, dst, replace=replace))


@pytest.mark.parametrize("case", ["scale_len", "scale_nan", "scale_zero", "scale_huge", "scale_pairs", "vmean_len",
                                  "vmean_inf", "schema1"])
def test_bad_transforms_are_refused_by_name(gemma, gemma_ident, tmp_path, case):
    import llama_cpp
    from qaq_gguf import runtime

    nk, nv = gemma_ident.n_key_mean(), gemma_ident.n_value_mean()
    good = _write(gemma_ident, "q4_0", "q4_0", tmp_path / "good.gguf", None, np.ones(nk, np.float32),
                  np.zeros(nv, np.float32))
    k_scale, v_mean = [1.0] * nk, [0.0] * nv
    replace, expect = {}, "k_scale"
    if case == "scale_len":
        replace["qaq.kv.k_scale"] = k_scale[:-1]
    elif case == "scale_nan":
        replace["qaq.kv.k_scale"] = k_scale[:7] + [float("nan")] + k_scale[8:]
    elif case == "scale_zero":
        replace["qaq.kv.k_scale"] = k_scale[:3] + [0.0] + k_scale[4:]
    elif case == "scale_huge":
        replace["qaq.kv.k_scale"] = k_scale[:3] + [1e9] + k_scale[4:]
    elif case == "scale_pairs":  # dimension 3 rotates with 3 + 128 in a NeoX head of 256, which keeps 1.0
        replace["qaq.kv.k_scale"] = k_scale[:3] + [2.0] + k_scale[4:]
    elif case == "vmean_len":
        replace["qaq.kv.v_mean"], expect = v_mean[:5], "v_mean"
    elif case == "vmean_inf":
        replace["qaq.kv.v_mean"], expect = [float("inf")] + v_mean[1:], "v_mean"
    elif case == "schema1":
        replace["qaq.schema_version"], expect = 1, "schema version"
    f = _rewrite(good, tmp_path / f"{case}.gguf", replace)
    with pytest.raises(ProfileError, match=expect):
        Llama(str(gemma), kv_profile=f, n_ctx=64, verbose=False)
    # and the native loader alone (what llama-server and llama-perplexity run) refuses it too, by name
    model = llama_cpp.llama_model_load_from_file(str(gemma).encode(), llama_cpp.llama_model_default_params())
    try:
        with pytest.raises(ProfileError, match=expect):
            runtime.apply_profile(model, gemma, f)
    finally:
        llama_cpp.llama_model_free(model)
