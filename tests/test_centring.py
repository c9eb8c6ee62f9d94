"""Centred keys: the cache stores k - mean (llama_model_set_kv_layer_k_mean via the profile's qaq.kv.k_mean).

Attention is unchanged (every query's logits move by one constant), so an f16 cache gives the same output with or
without centring; a quantized cache loses less, because Gemma 3's keys share a large common component.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_synthetic_model
from qaq_gguf import Llama, ProfileError, collect, evaluate, profile


@pytest.fixture(scope="module")
def key_means(gemma, calib_text) -> np.ndarray:
    """Per-layer mean keys of Gemma 3 270M on calibration text (one chunk), flat as a profile stores them."""
    chunk = next(collect.iter_chunks(gemma, calib_text, n_ctx=512, n_chunks=1, n_threads=2))
    ident = profile.model_identity(gemma)
    return np.concatenate([chunk[il].k.mean(axis=0).ravel() if il in chunk else
                           np.zeros(ident.n_embd_k(il), np.float32)
                           for il in range(ident.n_layer)]).astype(np.float32)


def _profile(ident, tk, tv, k_mean, path):
    p = profile.make_profile(ident, tk, tv)
    p.k_mean = k_mean
    return profile.write_profile(p, path)


def test_key_means_round_trip_through_the_profile(gemma_ident, key_means, tmp_path):
    f = _profile(gemma_ident, "q4_0", "q4_0", key_means, tmp_path / "c.gguf")
    p = profile.read_profile(f)
    np.testing.assert_array_equal(p.k_mean, key_means)
    assert "keys centred" in profile.describe(p)
    assert profile.read_profile(_profile(gemma_ident, "q4_0", "q4_0", None, tmp_path / "u.gguf")).k_mean is None
    with pytest.raises(ProfileError, match="k_mean has"):
        _profile(gemma_ident, "q4_0", "q4_0", key_means[:-1], tmp_path / "bad.gguf")


def test_centring_leaves_an_f16_cache_unchanged(gemma, gemma_ident, key_means, eval_text, tmp_path):
    """With an f16 cache only the rounding of the stored keys changes. Gemma 3 270M turns any such perturbation
    into KL-divergence ~0.0065 (docs/benchmarks.md: bf16 V or one q8_0 layer cost the same), so the bound is that
    floor, far below what a wrong or missing mean costs (the quantized test below)."""
    configs = [evaluate.CacheConfig("centred", profile=str(_profile(gemma_ident, "f16", "f16", key_means,
                                                                    tmp_path / "c.gguf")))]
    res = evaluate.evaluate(gemma, eval_text, configs, n_ctx=512, n_chunks=2, n_threads=2, progress=False)
    assert res["results"][0]["kld"] < 0.0085, res["results"][0]


@pytest.mark.parametrize("tk", ["q4_0", "qaq3"])
def test_centring_cuts_the_key_error(gemma, gemma_ident, key_means, eval_text, tmp_path, tk):
    """Same quantized K type, same tokens: KL-divergence to the f16 cache drops with centred keys."""
    configs = [evaluate.CacheConfig("plain", profile=str(_profile(gemma_ident, tk, "f16", None, tmp_path / "p.gguf"))),
               evaluate.CacheConfig("centred", profile=str(_profile(gemma_ident, tk, "f16", key_means,
                                                                    tmp_path / "c.gguf")))]
    res = evaluate.evaluate(gemma, eval_text, configs, n_ctx=512, n_chunks=2, n_threads=2, progress=False)
    kld = {r["label"]: r["kld"] for r in res["results"]}
    assert kld["centred"] < 0.75 * kld["plain"], kld


def test_centred_profile_survives_a_context_shift(gemma, gemma_ident, key_means, eval_text, tmp_path):
    """K-shift adds the mean back around RoPE: the continuation after a shift matches a fresh run as well as
    without centring."""
    from test_profile import _continuation

    kw = dict(n_ctx=256, n_batch=64, verbose=False, flash_attn=True, logits_all=True)
    ref = Llama(str(gemma), **kw)
    toks = ref.tokenize(eval_text.encode(), add_bos=True)[:200]
    agree = {}
    for name, mean in (("plain", None), ("centred", key_means)):
        llm = Llama(str(gemma), kv_profile=str(_profile(gemma_ident, "qaq3", "f16", mean, tmp_path / f"{name}.gguf")),
                    **kw)
        a, b = _continuation(ref, toks, True), _continuation(llm, toks, True)
        fresh = _continuation(llm, toks, False)
        agree[name] = (np.mean(a.argmax(1) == b.argmax(1)), np.mean(fresh.argmax(1) == b.argmax(1)))
    # centring must not make the shifted continuation worse than the plain cache's (a wrong mean around RoPE would)
    assert agree["centred"][0] >= agree["plain"][0] - 0.1, agree
    assert agree["centred"][1] >= 0.6, agree


def test_models_that_cannot_be_centred(tmp_path, gemma):
    assert profile.centring_blocked(gemma) is None
    m = write_synthetic_model(tmp_path / "m.gguf")
    assert profile.centring_blocked(m) is None
    from gguf import GGUFReader, GGUFWriter

    # a soft-capping model (Gemma 2 style key): refused
    r = GGUFReader(str(m))
    w = GGUFWriter(str(tmp_path / "softcap.gguf"), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    w.add_float32("llama.attn_logit_softcapping", 50.0)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(x) for x in t.shape])), raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert "soft-caps" in profile.centring_blocked(tmp_path / "softcap.gguf")
