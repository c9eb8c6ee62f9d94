"""Calibration's key statistics hold over the context a profile serves (calibrate(..., positions=N)): each chunk is
scored as if it started further into a sequence, so the key mean and scales fit keys at any position up to N."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import calibrate_briefly

from qaq_gguf import calibrate, cli, collect, profile, rope

RP = rope.RopeParams(n_rot=64, neox=True, freq_base=10000.0, freq_scale=1.0)


def _run(span: int, n_layer: int = 1) -> calibrate._Run:
    ident = profile.ModelIdentity("synthetic", n_layer, [1] * n_layer, [64] * n_layer, [64] * n_layer,
                                  [False] * n_layer, 0, "fp", "synthetic", rope_neox=True, n_rot=64)
    return calibrate._Run(ident, ["f16"], {il: ["f16"] for il in range(n_layer)}, method="measured",
                          max_queries=16, window=5, seed=0, center_keys=True, rebalance_keys=True,
                          center_values=True, exact_first=True, ropes={il: RP for il in range(n_layer)}, span=span)


def _chunk(n: int = 64, seed: int = 0) -> collect.LayerActivations:
    """Keys with a large pre-RoPE mean (what centring removes), queries, as RoPE leaves them at positions 0..n-1."""
    rng = np.random.default_rng(seed)
    pos = np.arange(n)
    k_pre = (rng.standard_normal((n, 1, 64)) + 3.0).astype(np.float32)
    q_pre = rng.standard_normal((n, 2, 64)).astype(np.float32)
    attn = np.tril(np.ones((2, n, n), np.float32))
    return collect.LayerActivations(q=rope.rope(q_pre, pos, RP), k=rope.rope(k_pre, pos, RP),
                                    v=rng.standard_normal((n, 1, 64)).astype(np.float32),
                                    attn=attn / attn.sum(-1, keepdims=True))


def test_offsets_start_at_zero_and_spread_over_the_span():
    run = _run(span=8192 - 512)
    offs = [run.offset(i) for i in range(16)]
    assert offs[0] == 0 and all(0 <= o <= 8192 - 512 for o in offs)
    assert len(set(offs)) == 16
    # evenly spread: every eighth of the span holds one of the first 16 offsets at least
    assert len({o * 8 // (8192 - 512) for o in offs}) == 8
    assert [_run(span=0).offset(i) for i in range(4)] == [0, 0, 0, 0]


def test_a_moved_chunk_is_the_same_tokens_further_in():
    """Moved by d, the keys are those RoPE gives at positions t + d, and every logit q_i . k_j is unchanged."""
    act = _chunk()
    run = _run(span=4000)
    moved = run._moved({0: act}, 1000)[0]
    pos = np.arange(len(act.k))
    np.testing.assert_allclose(moved.k, rope.rope(rope.unrope(act.k, pos, RP), pos + 1000, RP), atol=1e-3)  # float32 angles
    for h in range(2):
        np.testing.assert_allclose(moved.q[:, h] @ moved.k[:, 0].T, act.q[:, h] @ act.k[:, 0].T, rtol=1e-4,
                                   atol=2e-3)
    assert moved.v is act.v and moved.attn is act.attn
    assert run._moved({0: act}, 0)[0] is act


def test_moments_of_moved_chunks_keep_the_first_key_at_position_zero():
    """The first token's key is tracked as position 0 holds it (where a sequence's first token always is), while
    the mean is taken over the moved keys: far smaller where the pre-RoPE mean turns with the position."""
    act = _chunk()
    still, spread = calibrate._Moments(), calibrate._Moments()
    run = _run(span=8192)
    for i in range(8):
        moved = run._moved({0: act}, run.offset(i))[0]
        still.add(act, skip_first=True)
        spread.add(moved, skip_first=True, k_first=act.k[0])
    np.testing.assert_array_equal(spread.k_first, act.k[0])
    assert not spread.first_varies
    # the mean key of the short positions is most of the key; spread over 8k positions it turns and shrinks
    assert np.linalg.norm(spread.k_mean()) < 0.8 * np.linalg.norm(still.k_mean())


def test_calibration_records_the_positions_and_refuses_bad_ones(smollm2, calib_text):
    kw = dict(n_ctx=128, n_chunks=1, chat_chunks=0, max_queries=32, n_threads=2, progress=False, exact_cells=1)
    assert calibrate.calibrate(smollm2, calib_text, **kw).settings["positions"] == 8192  # its training context
    short = calibrate.calibrate(smollm2, calib_text, positions=128, **kw)
    assert short.settings["positions"] == 128
    with pytest.raises(ValueError, match="positions is 0: give the longest context the profile serves"):
        calibrate.calibrate(smollm2, calib_text, positions=0, **kw)


def _calibrated(smollm2, calib_text, tmp_path) -> profile.Profile:
    """`qaq-gguf calibrate --positions 2048` on 128 tokens of SmolLM2."""
    out = tmp_path / "p.gguf"
    calibrate_briefly(smollm2, calib_text, tmp_path, out, "--positions", "2048")
    return profile.read_profile(out)


def _older(p: profile.Profile, tmp_path):
    """The profile as calibration wrote it before the positions were spread (no calib_positions)."""
    del p.provenance["calib_positions"]
    return profile.write_profile(p, tmp_path / "old.gguf")


@pytest.mark.parametrize("value, why", [("0", "0: give the longest context"), ("-8192", "-8192: give the longest"),
                                        ("8k", "not a number of tokens: '8k'")])
def test_cli_refuses_bad_positions_by_name(tiny_model, tmp_path, capsys, value, why):
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text")
    with pytest.raises(SystemExit):
        cli.main(["calibrate", str(tiny_model), "--text", str(text), "--positions", value, "--budget", "8",
                  "-o", str(tmp_path / "o.gguf")])
    err = capsys.readouterr().err
    assert "--positions" in err and why in err and not (tmp_path / "o.gguf").exists()


def test_cli_positions_reach_the_profile(smollm2, calib_text, tmp_path):
    p = _calibrated(smollm2, calib_text, tmp_path)
    assert calibrate.scores_from_profile(p).settings["positions"] == 2048
    assert "key statistics: over positions up to 2048" in profile.describe(p)
    assert profile.key_positions_note(p, 2048) is None and profile.key_positions_note(p, 0) is None
    assert "--positions 4096" in profile.key_positions_note(p, 4096)
    # a profile calibrated before the positions were spread says so, and what to do
    del p.provenance["calib_positions"]
    assert "from the first 128 positions only" in profile.describe(p) and "calibrate again" in profile.describe(p)
    assert profile.key_positions_note(p, 128) is None
    assert "measured over positions up to 128" in profile.key_positions_note(p, 0)
    # a hand-edited profile's damaged value is not taken for positions: the first calib_n_ctx are what it covers
    for bad in ("8192", 2.5e9, [8192]):
        p.provenance["calib_positions"] = bad
        assert "from the first 128 positions only" in profile.describe(p)
        assert "measured over positions up to 128" in profile.key_positions_note(p, 4096)


def test_an_old_profile_for_a_long_context_is_said(smollm2, calib_text, tmp_path, capsys):
    """Llama(kv_profile=...) says when a context reaches past the positions the profile's key statistics cover."""
    from qaq_gguf import Llama

    old = _older(_calibrated(smollm2, calib_text, tmp_path), tmp_path)
    capsys.readouterr()
    llm = Llama(str(smollm2), kv_profile=str(old), n_ctx=1024, verbose=False)
    err = capsys.readouterr().err
    assert "measured over positions up to 128" in err and "--positions 1024" in err
    del llm
    llm = Llama(str(smollm2), kv_profile=str(old), n_ctx=128, verbose=False)
    assert "positions" not in capsys.readouterr().err
    del llm
