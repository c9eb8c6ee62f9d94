"""Calibration on the real models (Gemma 3 270M; SmolLM2 where the point is the architecture): activation collection through llama.cpp, scores, allocation, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qaq_gguf import cachetypes, calibrate, cli, collect, profile, scoring


@pytest.fixture(scope="module")
def chunk(gemma, calib_text):
    return next(collect.iter_chunks(gemma, calib_text, n_ctx=256, n_chunks=1, n_threads=2))


@pytest.fixture(scope="module")
def scores(gemma, calib_text) -> calibrate.Scores:
    return calibrate.calibrate(gemma, calib_text, n_ctx=256, n_chunks=2, max_queries=64, n_threads=2,
                               progress=False)


def test_collect_captures_every_layer_with_the_right_shapes(chunk, gemma_ident):
    assert sorted(chunk) == list(range(gemma_ident.n_layer))
    for il, a in chunk.items():
        assert a.q.shape == (256, 4, 256) and a.k.shape == (256, 1, 256) and a.v.shape == (256, 1, 256)
        assert a.attn.shape == (4, 256, 256)
        np.testing.assert_allclose(a.attn.sum(axis=-1), 1.0, atol=1e-4)
        assert np.all(np.triu(a.attn[0], k=1) == 0)  # causal: no query sees a later token
        assert np.isfinite(a.q).all() and np.isfinite(a.k).all() and np.isfinite(a.v).all()


def test_collected_attention_is_softmax_of_collected_q_and_k(chunk):
    # the keys we capture are the ones attention used: recompute the probabilities from q and k
    for il in (0, 5, 11):
        a = chunk[il]
        s = collect.estimate_kq_scale(a)
        assert s == pytest.approx(256 ** -0.5, rel=1e-3)  # Gemma 3: query_pre_attn_scalar = head_dim
        p = scoring.attention_probs(a.q, a.k, kq_scale=s, n_swa=512)
        assert np.abs(p - a.attn).max() < 5e-3


def test_scores_shape_order_and_provenance(scores, gemma_ident):
    c = scores.candidates
    assert scores.k.shape == scores.v.shape == (gemma_ident.n_layer, len(c))
    for table in (scores.k, scores.v):
        assert np.all(table >= 0)
        # per layer: f16 < q8_0 < q4_0 (coarser types predict more error)
        assert np.all(table[:, c.index("f16")] < table[:, c.index("q8_0")])
        assert np.all(table[:, c.index("q8_0")] < table[:, c.index("q4_0")])
    assert scores.settings["n_chunks"] == 2 and scores.settings["n_tokens"] == 512
    assert len(scores.settings["text_sha256"]) == 64


@pytest.mark.parametrize("budget", [4.5, 5.5, 6.5])
def test_allocation_respects_the_bits_budget(scores, budget):
    p = calibrate.allocate(scores, avg_bits=budget)
    assert profile.average_bits(p) <= budget + 1e-9
    assert p.provenance["budget_avg_bits"] == budget
    w = calibrate.KEY_WEIGHT  # the solver counts keys' scores this many times
    assert p.provenance["key_weight"] == w
    cost = sum(w * scores.k[il, scores.candidates.index(p.type_k[il])] + scores.v[il, scores.candidates.index(
        p.type_v[il])] for il in range(p.model.n_layer))
    assert cost == pytest.approx(p.provenance["predicted_error"])
    # no uniform pair of the same size or smaller predicts less error
    for tk in scores.candidates:
        for tv in scores.candidates:
            u = profile.make_profile(scores.ident, tk, tv)
            if profile.average_bits(u) <= budget:
                ucost = (w * scores.k[:, scores.candidates.index(tk)].sum()
                         + scores.v[:, scores.candidates.index(tv)].sum())
                assert cost <= ucost + 1e-12


def test_allocation_by_bytes_counts_sliding_window_layers(scores):
    n_ctx = 32768
    limit = profile.kv_bytes(profile.make_profile(scores.ident, "q8_0", "q4_0"), n_ctx)
    p = calibrate.allocate(scores, max_kv_bytes=limit, n_ctx=n_ctx)
    assert profile.kv_bytes(p, n_ctx) <= limit
    # at 32k the 15 sliding-window layers hold 1024 cells and the 3 global ones 32768: bits go to the globals,
    # so the average per-token bits (equal weights) can exceed q8_0/q4_0's 6.5 while the bytes do not
    assert p.provenance["budget_kv_bytes"] == limit and p.provenance["budget_n_ctx"] == n_ctx


def test_budget_below_the_smallest_type_is_a_clear_error(scores):
    with pytest.raises(ValueError, match="below the smallest"):
        calibrate.allocate(scores, avg_bits=2.0)  # qaq2, the smallest type, is 2.5 bits
    with pytest.raises(ValueError, match="one budget"):
        calibrate.allocate(scores)
    with pytest.raises(ValueError, match="needs n_ctx"):
        calibrate.allocate(scores, max_kv_bytes=10**6)


def test_unknown_candidate_and_short_text_fail_before_work(gemma):
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_x'"):
        calibrate.calibrate(gemma, "hello", candidates=["q8_0", "q3_x"], progress=False)
    with pytest.raises(ValueError, match="one chunk needs 512"):
        calibrate.calibrate(gemma, "Too short.", progress=False)


def test_frontier_profiles_are_monotone(scores):
    ps = calibrate.frontier(scores)
    bits = [profile.average_bits(p) for p in ps]
    errs = [p.provenance["predicted_error"] for p in ps]
    assert len(ps) >= 5 and bits == sorted(bits)
    assert all(a >= b - 1e-12 for a, b in zip(errs, errs[1:]))


def test_calibrated_profile_round_trips_and_runs(scores, gemma, tmp_path):
    import qaq_gguf

    p = calibrate.allocate(scores, avg_bits=5.5)
    f = profile.write_profile(p, tmp_path / "qaq.gguf")
    back = profile.read_profile(f)
    assert back.type_k == p.type_k and back.type_v == p.type_v
    again = calibrate.scores_from_profile(back)
    np.testing.assert_allclose(again.k, scores.k, rtol=1e-6)  # stored as float32
    assert calibrate.allocate(again, avg_bits=5.5).type_k == p.type_k
    llm = qaq_gguf.Llama(str(gemma), kv_profile=str(f), n_ctx=512, verbose=False, seed=0)
    info = llm.kv_layer_info()
    assert [r["type_k"] for r in info] == p.type_k and [r["type_v"] for r in info] == p.type_v
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    assert out["choices"][0]["text"].strip()


def test_cli_calibrate_then_resolve_from_stored_scores(gemma, calib_text, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(calib_text)
    out = tmp_path / "p55.gguf"
    rc = cli.main(["calibrate", str(gemma), "--text", str(text), "--budget", "5.5", "--chunks", "1", "--ctx", "256",
                   "--threads", "2", "-o", str(out)])
    assert rc == 0 and out.is_file()
    assert profile.average_bits(profile.read_profile(out)) <= 5.5
    out2 = tmp_path / "new" / "folder" / "p45.gguf"  # folders made, as a run's results go to a new one
    assert cli.main(["calibrate", str(gemma), "--scores", str(out), "--budget", "4.5", "-o", str(out2)]) == 0
    p2 = profile.read_profile(out2)
    assert profile.average_bits(p2) <= 4.5
    assert cli.main(["calibrate", str(gemma), "--scores", str(out), "--budget", "2", "-o", str(out2)]) == 2
    assert "below the smallest" in capsys.readouterr().err


def test_spearman():
    from qaq_gguf.ablate import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.894427, rel=1e-5)  # ties share ranks


def test_frontier_and_ablate_commands_write_results(gemma, scores, eval_text, tmp_path, capsys):
    import json

    prof = profile.write_profile(calibrate.allocate(scores, avg_bits=6.5), tmp_path / "scores.gguf")
    text = tmp_path / "test.txt"
    text.write_text(eval_text)
    out = tmp_path / "fr"
    assert cli.main(["frontier", str(gemma), "--scores", str(prof), "--text", str(text), "--budgets", "6.5",
                     "--pairs", "q8_0/q4_0", "--ctx", "256", "--chunks", "1", "--threads", "2", "-o", str(out)]) == 0
    res = json.loads((out / "frontier.json").read_text())
    assert [r["series"] for r in res["results"]] == ["uniform", "calibrated"]
    assert all(r["bits"] <= 6.5 for r in res["results"])
    assert (out / "frontier.png").stat().st_size > 10_000 and (out / "qaq-6.5bits.gguf").is_file()
    assert "best uniform" in capsys.readouterr().out

    out = tmp_path / "ab"
    assert cli.main(["ablate", str(gemma), "--scores", str(prof), "--text", str(text), "--ctx", "256",
                     "--chunks", "1", "--threads", "2", "-o", str(out)]) == 0
    res = json.loads((out / "ablate.json").read_text())
    assert len(res["rows"]) == 2 * 18 and set(res["spearman"]) == {"K", "V", "all"}
    assert all(r["kld"] > 0 for r in res["rows"])
    # the floor: every layer f16 with the profile's transforms, no cache error, yet not 0 (docs: ablate.py)
    assert 0 < res["floor"]["kld"] < np.median([r["kld"] for r in res["rows"]])
    assert "floor (every layer f16" in capsys.readouterr().out
    assert (out / "ablate.png").is_file()


def test_demo_runs_the_main_job_end_to_end(gemma, tmp_path, capsys):
    """The README's first command, scaled down: calibrate on the packaged sample, evaluate beside a uniform pair,
    generate with the profile."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--calib-chunks", "1", "--chunks", "1", "--n-ctx", "256", "--budgets", "4.5",
                     "--pairs", "q4_0/q4_0", "--max-tokens", "4", "--threads", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1/3 calibrating" in text and "3/3 generating" in text and "q4_0/q4_0" in text
    assert (out / "qaq-4.5bits.gguf").exists() and (out / "demo.json").exists()
    # one bits figure per profile: the table's, the summary's and the profile's own agree
    bits = profile.average_bits(profile.read_profile(out / "qaq-4.5bits.gguf"))
    res = json.loads((out / "demo.json").read_text())
    row = next(r for r in res["results"] if r.get("profile"))
    assert row["avg_bits"] == pytest.approx(bits, abs=1e-9)
    assert f"{bits:.3f}" in text and f"{bits:.2f} bits per value" in text


def test_key_scales_and_value_means_kept_only_in_layers_where_they_pay(smollm2, calib_text):
    """Calibration scores every layer with and without rebalanced keys and centred values and keeps each where it
    lowers the layer's scores: a layer without gets scales 1 / mean 0 and exactly the plain run's scores."""
    kw = dict(n_ctx=128, n_chunks=2, chat_chunks=0, max_queries=64, n_threads=2, progress=False, exact_cells=1)
    s = calibrate.calibrate(smollm2, calib_text, **kw)
    plain = calibrate.calibrate(smollm2, calib_text, rebalance_keys=False, center_values=False, **kw)
    ident = s.ident
    quant = [j for j, c in enumerate(s.candidates) if cachetypes.get(c).is_quantized]
    ok = ov = 0
    kept_k = kept_v = 0
    for il in s.layers():
        nk, nv = ident.n_embd_k(il), ident.n_embd_v(il)
        scale, mean = s.k_scale[ok:ok + nk], s.v_mean[ov:ov + nv]
        if np.all(scale == 1.0):
            np.testing.assert_array_equal(s.k[il], plain.k[il])
        else:
            kept_k += 1
            assert np.sum(np.log(s.k[il, quant])) <= np.sum(np.log(plain.k[il, quant]))
        if np.all(mean == 0.0):
            np.testing.assert_array_equal(s.v[il], plain.v[il])
        else:
            kept_v += 1
            assert np.sum(np.log(s.v[il, quant])) <= np.sum(np.log(plain.v[il, quant]))
        ok, ov = ok + nk, ov + nv
    assert s.settings["rebalanced_layers"] == kept_k and s.settings["centred_value_layers"] == kept_v
    print(f"SmolLM2: keys rebalanced in {kept_k}, values centred in {kept_v} of {len(s.layers())} layers")
    p = calibrate.allocate(s, avg_bits=4.0)
    assert "keys rebalanced" in profile.describe(p)
