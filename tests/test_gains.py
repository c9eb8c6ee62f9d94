"""Measured gains (ablate.gains): each layer's end-to-end cost per unit of its score, the solver's weights.

Fast tests on the synthetic model (the arithmetic, the solver, the profile keys and their damage); one real run of
`qaq-gguf calibrate --gains` on SmolLM2-135M with few tokens."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import calibrate_briefly, rewrite_profile

from qaq_gguf import ablate, calibrate, cli, profile
from qaq_gguf.errors import ProfileError


def _scores(ident: profile.ModelIdentity) -> calibrate.Scores:
    """Two candidates per layer: f16 (no error) and q4_0, K and V alike."""
    n = ident.n_layer
    k = np.zeros((n, 2))
    v = np.zeros((n, 2))
    k[:, 1] = 1.0
    v[:, 1] = 1.0
    return calibrate.Scores(ident, ["f16", "q4_0"], k, v, {"method": "measured"})


def _ablation(ident: profile.ModelIdentity, kld_k, kld_v, floor: float, predicted: float = 1.0) -> dict:
    rows = [{"layer": il, "part": part, "type": "q4_0", "predicted": predicted, "kld": kld, "kld_err": 1e-4}
            for part, klds in (("K", kld_k), ("V", kld_v)) for il, kld in enumerate(klds)]
    return {"type": "q4_0", "rows": rows, "floor": {"kld": floor, "kld_err": 1e-4, "dppl_pct": 0.0},
            "settings": {"n_chunks": 4, "n_ctx": 512}}


def test_gains_are_the_kld_above_the_floor_per_unit_of_score(tiny_model):
    ident = profile.model_identity(tiny_model)
    n = ident.n_layer
    assert n >= 2
    kld_k = [0.003 + 0.001 * (il + 1) for il in range(n)]
    kld_v = [0.003 + 0.0005 for _ in range(n)]
    s = ablate.with_gains(_scores(ident), _ablation(ident, kld_k, kld_v, floor=0.003, predicted=0.5), shrink=1.0)
    np.testing.assert_allclose(s.gain_k, [0.002 * (il + 1) for il in range(n)])
    np.testing.assert_allclose(s.gain_v, [0.001] * n)
    assert s.settings["gain_type"] == "q4_0" and s.settings["gain_floor"] == 0.003
    assert s.settings["gain_tokens"] == 2048 and s.settings["gain_shrink"] == 1.0

    # by default halfway (geometrically) toward the part's mean; shrink 0: one gain per part
    half = ablate.with_gains(_scores(ident), _ablation(ident, kld_k, kld_v, floor=0.003, predicted=0.5))
    mean = np.exp(np.mean(np.log(s.gain_k)))
    np.testing.assert_allclose(half.gain_k, np.sqrt(s.gain_k * mean))
    assert ablate.GAIN_SHRINK == 0.5 and half.settings["gain_shrink"] == 0.5
    flat = ablate.with_gains(_scores(ident), _ablation(ident, kld_k, kld_v, floor=0.003, predicted=0.5), shrink=0.0)
    np.testing.assert_allclose(flat.gain_k, [mean] * n)

    # an ablation within the floor's noise gets a tenth of its part's median (of the measured gains), never 0 or less
    kld_k[0] = 0.0029
    s = ablate.with_gains(_scores(ident), _ablation(ident, kld_k, kld_v, floor=0.003), shrink=1.0)
    measured = [max(x - 0.003, 0.0) for x in kld_k]
    assert s.gain_k[0] == pytest.approx(ablate.GAIN_MIN_FRACTION * np.median(measured)) and s.gain_k[0] > 0
    np.testing.assert_allclose(s.gain_k[1:], measured[1:])

    with pytest.raises(ValueError, match="no V ablation in q4_0 measured above the floor"):
        ablate.with_gains(_scores(ident), _ablation(ident, kld_k, [0.002] * n, floor=0.003))
    # two ablations (two types): the geometric mean of their gains
    other = _ablation(ident, [0.003 + 0.004 * (il + 1) for il in range(n)], kld_v, floor=0.003, predicted=0.5)
    other["type"] = "qaq3"
    first = _ablation(ident, [0.003 + 0.001 * (il + 1) for il in range(n)], kld_v, floor=0.003, predicted=0.5)
    both = ablate.with_gains(_scores(ident), [first, other], shrink=1.0)
    np.testing.assert_allclose(both.gain_k, [np.sqrt(0.002 * 0.008) * (il + 1) for il in range(n)])
    assert both.settings["gain_type"] == "q4_0,qaq3"

    res = _ablation(ident, kld_k, kld_v, floor=0.003)
    res["rows"] = [r for r in res["rows"] if r["layer"] != 1]
    with pytest.raises(ValueError, match=f"measured K in {n - 1} of {n} layers"):
        ablate.with_gains(_scores(ident), res)


def test_the_solver_spends_bits_where_the_gains_are(tiny_model):
    """Equal scores everywhere: without gains keys win (KEY_WEIGHT), with gains the layer whose V costs most does."""
    ident = profile.model_identity(tiny_model)
    n = ident.n_layer
    s = _scores(ident)
    budget = (16 + 4.5 * (2 * n - 1)) / (2 * n)  # room for exactly one f16 cache among the 2n
    plain = calibrate.allocate(s, avg_bits=budget)
    assert plain.type_k.count("f16") == 1 and plain.type_v.count("f16") == 0
    assert plain.provenance["key_weight"] == calibrate.KEY_WEIGHT

    kld_v = [0.01] * n
    kld_v[n - 1] = 0.05  # the last layer's values cost most end to end
    g = ablate.with_gains(s, _ablation(ident, [0.02] * n, kld_v, floor=0.005), shrink=1.0)
    p = calibrate.allocate(g, avg_bits=budget)
    assert p.type_v[n - 1] == "f16" and p.type_k.count("f16") == 0
    assert "key_weight" not in p.provenance and p.provenance["calib_gain_type"] == "q4_0"


def test_gains_survive_the_profile(tiny_model, tmp_path):
    ident = profile.model_identity(tiny_model)
    n = ident.n_layer
    g = ablate.with_gains(_scores(ident), _ablation(ident, [0.02] * n, [0.01 * (il + 1) for il in range(n)], 0.005))
    path = profile.write_profile(calibrate.allocate(g, avg_bits=8.0), tmp_path / "p.gguf")
    back = calibrate.scores_from_profile(profile.read_profile(path))
    np.testing.assert_allclose(back.gain_k, g.gain_k, rtol=1e-6)  # float32 in the file
    np.testing.assert_allclose(back.gain_v, g.gain_v, rtol=1e-6)
    assert calibrate.allocate(back, avg_bits=6.0).type_v == calibrate.allocate(g, avg_bits=6.0).type_v
    assert "solver weights: each layer's measured gain (ablations in q4_0)" in profile.describe(profile.read_profile(path))
    plain = profile.write_profile(calibrate.allocate(_scores(ident), avg_bits=8.0), tmp_path / "plain.gguf")
    assert f"solver weights: keys' scores x {calibrate.KEY_WEIGHT:g}" in profile.describe(profile.read_profile(plain))


@pytest.mark.parametrize("damage, match", [
    (dict(gain_k=-1.0), r"qaq.stats.gain_k holds -1 at 0, outside \[0, 1e\+06\]"),
    (dict(gain_v=np.nan), "qaq.stats.gain_v holds a non-finite value at 0"),
    (dict(gain_k="short"), "qaq.stats.gain_k has 1 entries, expected 2 \\(one per layer\\)"),
    (dict(gain_v=None), "qaq.stats.gain_k and gain_v come together"),
    (dict(candidates=None), "qaq.stats.gain_k and gain_v come together and with the scores"),
])
def test_damaged_gains_are_refused_by_name(tiny_model, tmp_path, damage, match):
    from qaq_gguf import runtime
    from qaq_gguf import llama as qllama

    ident = profile.model_identity(tiny_model)
    n = ident.n_layer
    g = ablate.with_gains(_scores(ident), _ablation(ident, [0.02] * n, [0.01] * n, 0.005))
    p = calibrate.allocate(g, avg_bits=8.0)
    for key, value in damage.items():
        if key == "candidates":
            p.candidates, p.score_k, p.score_v = [], None, None  # gains stay, the scores they weigh go
            p.gain_k, p.gain_v = g.gain_k, g.gain_v
        elif value is None:
            setattr(p, key, None)
        elif value == "short":
            setattr(p, key, np.ones(1))
        else:
            arr = np.array(getattr(p, key), np.float32)
            arr[0] = value
            setattr(p, key, arr)
    path = tmp_path / "bad.gguf"
    _write_raw(p, path)
    with pytest.raises(ProfileError, match=match):
        profile.read_profile(path)
    if "come together" not in match:  # the native validator checks each array (the pairing is the reader's)
        with qllama.vocab_only_model(tiny_model) as (model, _, _):
            with pytest.raises(ProfileError, match=match.split(" holds")[0].split(" has")[0]):
                runtime.check_profile(qllama.as_ctypes_model(model), tiny_model, path)


def _write_raw(p: profile.Profile, path) -> None:
    """write_profile without its pairing (a hand-edited file): the gains written as they are."""
    gains = {f"qaq.stats.{k}": getattr(p, k) for k in ("gain_k", "gain_v") if getattr(p, k) is not None}
    p.gain_k = p.gain_v = None
    plain = profile.write_profile(p, Path(path).with_suffix(".plain.gguf"))
    rewrite_profile(plain, path, add=gains)


def test_calibrate_gains_on_smollm2(smollm2, calib_text, tmp_path, capsys):
    """`calibrate --scores P --gains tcq3` on the real model (few tokens, one type: the default measures two, the
    same loop): gains for every layer, the profile keeps them and says how they were measured."""
    base = tmp_path / "base.gguf"
    text = calibrate_briefly(smollm2, calib_text, tmp_path, base, "--candidates", "f16,q8_0,tcq3,tcq2")
    out = tmp_path / "gains.gguf"
    assert cli.main(["calibrate", str(smollm2), "--scores", str(base), "--text", str(text), "--gains", "tcq3",
                     "--gains-chunks", "1", "--ctx", "128", "--budget", "4.0", "--threads", "2", "-o", str(out)]) == 0
    p = profile.read_profile(out)
    n = p.model.n_layer
    assert p.gain_k.shape == (n,) and p.gain_v.shape == (n,)
    assert np.all(p.gain_k > 0) and np.all(p.gain_v > 0)
    assert p.provenance["calib_gain_type"] == "tcq3" and p.provenance["calib_gain_tokens"] == 128
    assert p.provenance["calib_gain_shrink"] == ablate.GAIN_SHRINK
    assert 0 < p.provenance["calib_gain_floor"] < 0.1
    assert "key_weight" not in p.provenance
    assert "measuring each layer's gain" in capsys.readouterr().err


def test_gains_refused_by_name_before_any_run(tiny_model, tmp_path):
    ident = profile.model_identity(tiny_model)
    f = profile.write_profile(calibrate.allocate(_scores(ident), avg_bits=8.0), tmp_path / "p.gguf")
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text")
    out = str(tmp_path / "o.gguf")
    with pytest.raises(SystemExit, match="--gains runs the model: give the calibration text"):
        cli.main(["calibrate", str(tiny_model), "--scores", str(f), "--gains", "--budget", "8", "-o", out])
    with pytest.raises(SystemExit, match=r"--gains default: tcq3, tcq2 not among the scored candidates \(f16, q4_0\)"):
        cli.main(["calibrate", str(tiny_model), "--scores", str(f), "--text", str(text), "--gains", "--budget", "8",
                  "-o", out])
    with pytest.raises(SystemExit, match="--gains q4_0,qaq9: qaq9 not among the scored candidates"):
        cli.main(["calibrate", str(tiny_model), "--scores", str(f), "--text", str(text), "--gains", "q4_0,qaq9",
                  "--budget", "8", "-o", out])
    with pytest.raises(SystemExit, match="--gains-chunks 0: each gain needs at least one chunk"):
        cli.main(["calibrate", str(tiny_model), "--scores", str(f), "--text", str(text), "--gains", "q4_0",
                  "--gains-chunks", "0", "--budget", "8", "-o", out])
    assert not Path(out).exists()
