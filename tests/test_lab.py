"""The method lab's harness on Gemma 3 270M: the rewrite path is faithful (identity gives KLD 0, cache updates
land on the right cells, llama.cpp's own types rewritten match the native caches), specs parse, and a fitted
method is bound to its model."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import synthetic_calibration
from qaq_gguf import collect, evaluate, lab, methods, profile, rope
from qaq_gguf.methods import Bits, MethodError
from qaq_gguf.rewrite import CacheUpdate


class _RefreshNoop:
    """Keys as they are; before every batch, rewrites every cached token's key with its own exact value through
    the cache-update path. If the update landed on other cells than the tokens' own, attention would change."""

    name = label = "refresh-noop"
    paper = "-"
    rewrites = frozenset({"k"})
    observes = frozenset({"k"})

    def fit(self, calib):
        self.fingerprint = calib.ident.fingerprint

    def begin(self, n_ctx):
        self.keys = {}

    def apply(self, il, kind, x, pos):
        self.keys.setdefault(il, {}).update({int(p): x[i].copy() for i, p in enumerate(pos)})
        return x

    def refresh(self, pos_next):
        out = []
        for il, rows in self.keys.items():
            pos = np.array(sorted(p for p in rows if p < pos_next))
            if len(pos):
                out.append(CacheUpdate(il, "k", pos, np.stack([rows[p] for p in pos])))
        return out

    def bits(self, n_ctx):
        return Bits(16, 16)


@pytest.fixture(scope="module")
def faithfulness(gemma, calib_text, eval_text):
    """One lab run: identity, the refresh no-op, and llama.cpp's q8_0 and q4_0 as rewrites beside the native
    caches, on the same tokens."""
    calib = lab.collect_calibration(gemma, calib_text, n_ctx=256, n_chunks=1, n_threads=2, progress=False)
    meths = methods.make("identity") + methods.make("ggml:q8_0/q8_0") + methods.make("ggml:q4_0/q4_0") + \
        [_RefreshNoop()]
    for m in meths:
        m.fit(calib)
    cfgs = [evaluate.CacheConfig("native:q8_0/q8_0", type_k="q8_0", type_v="q8_0"),
            evaluate.CacheConfig("native:q4_0/q4_0", type_k="q4_0", type_v="q4_0")]
    cfgs += [evaluate.CacheConfig(m.label, method=m) for m in meths]
    res = evaluate.evaluate(gemma, eval_text, cfgs, n_ctx=512, n_chunks=2, n_threads=2, progress=False,
                            swa_full=True)
    return {r["label"]: r for r in res["results"]}, calib


def test_identity_rewrite_gives_kld_zero(faithfulness):
    rows, _ = faithfulness
    assert rows["identity"]["kld"] == 0.0
    assert rows["identity"]["top1"] == 100.0


def test_cache_updates_land_on_their_tokens(faithfulness):
    rows, _ = faithfulness
    assert rows["refresh-noop"]["kld"] == 0.0


@pytest.mark.parametrize("t", ["q8_0", "q4_0"])
def test_rewritten_ggml_types_match_the_native_cache(faithfulness, t):
    """The simulation of a native cache (real quantizers, Hadamard rotation, Q rounding) measures the native
    cache's KL-divergence within the noise of the two estimates."""
    rows, _ = faithfulness
    sim, nat = rows[f"ggml:{t}/{t}"], rows[f"native:{t}/{t}"]
    noise = 3 * np.hypot(sim["kld_err"], nat["kld_err"])
    assert abs(sim["kld"] - nat["kld"]) <= max(noise, 0.1 * nat["kld"]), (sim["kld"], nat["kld"], noise)
    assert sim["kld"] > 0


def test_calibration_activations(faithfulness, gemma_ident):
    _, calib = faithfulness
    assert sorted(calib.layers) == [il for il in range(gemma_ident.n_layer) if gemma_ident.has_kv(il)]
    L = calib.layers[5]
    n = 256
    assert L.k.shape == (n, 1, 256) and L.v.shape == (n, 1, 256) and L.q_norm2.shape == (n, 4)
    assert np.all(L.k_weight >= 0) and np.all(L.v_weight >= 0) and L.k_weight.sum() > 0
    assert abs(L.kq_scale - 1 / 16) < 1e-3  # Gemma 3 scales Q by 1/sqrt(256) after Qcur
    # the first token is the attention sink: it gets far more attention than the average token
    assert L.attn_recv[0, 0] > 10 * np.median(L.attn_recv[:, 0])
    assert L.rope is not None and L.rope.neox


def test_numpy_rope_matches_llama_cpp(gemma, gemma_ident, calib_text):
    """The lab's RoPE port (for methods that quantize before RoPE) reproduces llama.cpp's: un-RoPE of the cached
    keys gives the graph's pre-RoPE keys (Gemma 3 names them Kcur_normed)."""
    import qaq_gguf.collect as col

    got = {}
    names = re.compile(r"^(Kcur|Kcur_normed)-(\d+)$")

    old_name, old_wanted, old_asm = col._NAME, col.WANTED, col._assemble
    col._NAME, col.WANTED = names, ("Kcur", "Kcur_normed")
    col._assemble = lambda g, n: got.update(g) or {}
    try:
        for _ in col.iter_chunks(gemma, calib_text, n_ctx=128, n_chunks=1, n_threads=2):
            break
    finally:
        col._NAME, col.WANTED, col._assemble = old_name, old_wanted, old_asm
    layers = (0, 5)
    rp = rope.rope_params(gemma, gemma_ident, layers)
    assert rp[0].freq_base == 10000.0 and rp[5].freq_base == 1e6  # sliding-window vs global layers
    for il in layers:
        k = got[("Kcur", il)].reshape(128, 1, 256)
        pre = got[("Kcur_normed", il)].reshape(128, 1, 256)
        np.testing.assert_allclose(rope.unrope(k, np.arange(128), rp[il]), pre, atol=2e-5 * np.abs(pre).max())
        np.testing.assert_allclose(rope.rope(pre, np.arange(128), rp[il]), k, atol=2e-5 * np.abs(k).max())


def test_specs():
    meths, natives = lab.parse_specs(["ggml:q4_0/q8_0", "native:q4_0/q4_0", "identity"])
    assert [m.label for m in meths] == ["ggml:q4_0/q8_0", "identity"]
    assert natives[0].type_k == "q4_0" and natives[0].label == "native:q4_0/q4_0"
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        lab.parse_specs(["nope"])
    with pytest.raises(MethodError, match="given twice"):
        lab.parse_specs(["identity", "identity"])
    with pytest.raises(MethodError, match="native needs"):
        lab.parse_specs(["native"])
    with pytest.raises(FileNotFoundError):
        lab.parse_specs(["native:/nonexistent/profile.gguf"])
    m = methods.make("ggml:q4_0/q8_0")[0]
    assert (m.bits(1024).k, m.bits(1024).v) == (4.5, 8.5)  # 18 bytes per 32 values; 34 per 32
    assert set(methods.PUBLISHED) <= set(methods.REGISTRY)


def test_fitted_method_is_bound_to_its_model():
    calib = synthetic_calibration()
    m = methods.make("identity")[0]
    with pytest.raises(MethodError, match="not fitted"):
        methods.check_fitted(m, calib.ident)
    m.fit(calib)
    methods.check_fitted(m, calib.ident)
    other = profile.ModelIdentity(**{**calib.ident.__dict__, "fingerprint": "another-model"})
    with pytest.raises(MethodError, match="fitted on a model with fingerprint"):
        methods.check_fitted(m, other)


def test_lab_refuses_to_fit_on_the_evaluation_text(gemma, eval_text):
    with pytest.raises(ValueError, match="calibration text is the evaluation text"):
        lab.run(gemma, eval_text, eval_text, ["identity"])


def test_rewriter_reports_method_errors(gemma, eval_text):
    """A method that returns a wrong shape stops the decode with a named error, not a crash."""

    class Bad(_RefreshNoop):
        name = label = "bad"

        def apply(self, il, kind, x, pos):
            return x[:1]

        refresh = None

    m = Bad()
    m.fingerprint = "x"
    from qaq_gguf.rewrite import RewriteError

    with pytest.raises(RewriteError, match="bad: Kcur-0: the method returned shape"):
        evaluate.evaluate(gemma, eval_text, [evaluate.CacheConfig("bad", method=m)], n_ctx=64, n_chunks=1,
                          n_threads=2, progress=False)


def test_every_method_runs_end_to_end(gemma, calib_text, eval_text):
    """Each published method, one setting, through the whole lab (fit on calibration text, rewrite inside
    llama.cpp, bits accounting): finite KL-divergence, bits within the method's range, one row each."""
    specs = ["qaq:3", "aquakv:2", "qjl:3", "cq:2", "kivi:2", "kvquant:3", "turboquant:3", "native:q4_0/q4_0"]
    res = lab.run(gemma, calib_text, eval_text, specs, n_ctx=512, n_chunks=1, n_batch=128, calib_ctx=256,
                  calib_chunks=2, n_threads=2, progress=False)
    rows = {r["label"]: r for r in res["results"]}
    assert len(rows) == len(specs)
    for label, r in rows.items():
        assert np.isfinite(r["kld"]) and r["kld"] > 0, (label, r["kld"])
        assert 1.0 < r["avg_bits"] < 40.0, (label, r["avg_bits"])  # model-constant side information can dominate
        if r["family"] != "native":
            assert r["paper"] and r["bits_detail"], label
    assert set(methods.PUBLISHED) == {r["family"] for r in res["results"] if r["family"] != "native"}


def test_qaq_runs_on_a_graph_that_computes_values_first(smollm2, calib_text, eval_text):
    """Llama's graph computes V before the roped Q and K; QAQ's value rule needs the batch's attention, so the
    rewriter hands V over after them (it stopped with 'values before the batch's queries and keys' before)."""
    res = lab.run(smollm2, calib_text, eval_text, ["qaq:3", "native:q4_0/q4_0"], n_ctx=256, n_chunks=1, n_batch=64,
                  calib_ctx=256, calib_chunks=2, n_threads=2, progress=False)
    rows = {r["label"]: r for r in res["results"]}
    assert np.isfinite(rows["qaq:3"]["kld"]) and rows["qaq:3"]["kld"] > 0
    assert 2.0 < rows["qaq:3"]["avg_bits"] < 16.0


def test_frontier_takes_profiles_calibrated_before(gemma, calib_text, eval_text, tmp_path):
    """--frontier PROFILE.gguf: a profile calibrated beforehand is scored in the same run and drawn as the frontier;
    no calibration runs (no methods either: nothing is fitted)."""
    f = profile.write_profile(profile.make_profile(profile.model_identity(gemma), "q8_0", "q4_0"), tmp_path / "p.gguf")
    res = lab.run(gemma, calib_text, eval_text, ["native:q8_0/q8_0"], frontier=[str(f)], n_ctx=128, n_chunks=1,
                  n_threads=2, progress=False, work_dir=tmp_path / "work")
    rows = {r["label"]: r for r in res["results"]}
    assert rows["calibrated:p"]["family"] == "frontier" and rows["native:q8_0/q8_0"]["family"] == "native"
    assert rows["calibrated:p"]["kld"] > rows["native:q8_0/q8_0"]["kld"] > 0  # q4_0 values cost more than q8_0
    assert not (tmp_path / "work").exists() and res["lab"]["calib_chunks"] == 0


def test_values_handed_over_late_still_reach_the_cache(smollm2, eval_text):
    """The deferred V is written into Vcur before the cache copy and attention read it: a method that rewrites V
    the same way gives the same KL-divergence whether it takes V first or last."""
    from qaq_gguf.methods import ggml as ggml_method

    first, last = ggml_method.make("f16/qaq2"), ggml_method.make("f16/qaq2")
    last.values_need_attention = True
    res = evaluate.evaluate(smollm2, eval_text, [evaluate.CacheConfig("first", method=first),
                                                 evaluate.CacheConfig("last", method=last)],
                            n_ctx=128, n_chunks=1, n_batch=64, n_threads=2, progress=False)
    a, b = res["results"]
    assert a["kld"] > 1e-3  # 2-bit values do cost something
    assert b["kld"] == pytest.approx(a["kld"], rel=1e-6, abs=1e-9)
