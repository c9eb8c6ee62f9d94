"""Calibration works by default on any shape llama.cpp runs: head sizes 64-256, GQA 1 to 8, MQA.

Random-weight GGUFs (tools/synth_gguf.py, f16 weights, a byte-level vocabulary) of each shape are calibrated with
the default candidates; a type whose blocks do not divide the head size is left out with one line saying so, and a
model no quantized type fits is refused by name.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from qaq_gguf import cachetypes, calibrate, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import synth_gguf  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40)


def _model(tmp_path_factory, head: int, n_head: int, n_head_kv: int) -> Path:
    preset = dict(n_layer=2, n_embd=head * n_head, n_head=n_head, n_head_kv=n_head_kv, n_ff=256, n_vocab=512,
                  ctx=4096, rope_base=10000.0)
    path = tmp_path_factory.mktemp("shapes") / f"h{head}-q{n_head}-kv{n_head_kv}.gguf"
    return synth_gguf.write(path, preset, GGMLQuantizationType.F16)


SHAPES = [  # (head size, query heads, KV heads)
    (64, 9, 3),    # SmolLM2's attention: GQA 3
    (64, 8, 1),    # MQA
    (96, 4, 4),    # no GQA
    (128, 8, 1),   # MQA at 128
    (128, 8, 2),   # GQA 4
    (128, 8, 8),   # GQA 1
    (128, 16, 2),  # GQA 8
    (256, 4, 1),   # Gemma 3's attention
]


@pytest.mark.parametrize("head,n_head,n_head_kv", SHAPES)
def test_default_calibration_on_every_shape(tmp_path_factory, capsys, head, n_head, n_head_kv):
    path = _model(tmp_path_factory, head, n_head, n_head_kv)
    scores = calibrate.calibrate(path, TEXT, n_ctx=128, n_chunks=1, progress=False, n_threads=1)
    fit = [c for c in calibrate.default_candidates() if cachetypes.fits(c, head)]
    assert scores.candidates == fit
    err = capsys.readouterr().err
    left = [c for c in calibrate.default_candidates() if c not in fit]
    if left:
        assert "candidates left out: " + ", ".join(f"{c} (blocks of {cachetypes.get(c).block_size})"
                                                    for c in left) in err
    else:
        assert "candidates left out" not in err
    assert np.isfinite(scores.k).all() and np.isfinite(scores.v).all()
    prof = calibrate.allocate(scores, avg_bits=4.0)
    assert profile.average_bits(prof) <= 4.0 + 1e-9
    assert all(cachetypes.fits(t, head) for t in prof.type_k + prof.type_v)


@pytest.mark.parametrize("head", [80, 112])
def test_a_model_no_quantized_type_fits_is_refused_by_name(tmp_path_factory, head):
    path = _model(tmp_path_factory, head, 4, 2)
    with pytest.raises(ValueError, match=rf"no quantized cache type fits layer 0 \(head size K {head}, V {head}"):
        calibrate.calibrate(path, TEXT, n_ctx=128, n_chunks=1, progress=False, n_threads=1)


def test_unfit_types_score_as_unfit_per_layer():
    """A layer whose head a type cannot hold gets the UNFIT score for it, and the solver never picks it."""
    ident = profile.ModelIdentity("synthetic", 2, [1, 1], [64, 128], [64, 128], [False, False], 0, "fp", "mixed")
    kept, per_layer = calibrate.fitting_candidates(ident, ["f16", "q4_0", "qaq3l"], quiet=True)
    assert kept == ["f16", "q4_0", "qaq3l"]
    assert per_layer == {0: ["f16", "q4_0"], 1: ["f16", "q4_0", "qaq3l"]}
    k = np.array([[0.0, 0.1, calibrate.UNFIT], [0.0, 0.1, 0.2]])
    scores = calibrate.Scores(ident, kept, k, k.copy())
    prof = calibrate.allocate(scores, avg_bits=3.6)
    assert prof.type_k == ["q4_0", "qaq3l"] and prof.type_v == ["q4_0", "qaq3l"]


def test_layers_scored_in_parallel_give_the_same_scores(tmp_path_factory):
    path = _model(tmp_path_factory, 64, 9, 3)
    one = calibrate.calibrate(path, TEXT, n_ctx=128, n_chunks=2, progress=False, n_threads=1)
    two = calibrate.calibrate(path, TEXT, n_ctx=128, n_chunks=2, progress=False, n_threads=2)
    np.testing.assert_array_equal(one.k, two.k)
    np.testing.assert_array_equal(one.v, two.v)
    np.testing.assert_array_equal(one.k_scale, two.k_scale)


def test_asked_candidates_that_fit_no_layer_are_left_out_and_unmeasured_ones_refused():
    """--candidates naming a type no layer can hold (qaq4l on heads of 64: calibration left it out, saying so) solves
    without it; one that fits but was not measured in the scores is refused by name, not a bare list error."""
    ident = profile.ModelIdentity("synthetic", 2, [1, 1], [64, 64], [64, 64], [False, False], 0, "fp", "mixed")
    k = np.array([[0.0, 0.1], [0.0, 0.2]])
    scores = calibrate.Scores(ident, ["f16", "q4_0"], k, k.copy())
    prof = calibrate.allocate(scores, avg_bits=4.5, candidates=["f16", "q4_0", "qaq4l"])
    assert prof.type_k == ["q4_0", "q4_0"]
    with pytest.raises(ValueError, match="tcq3 were not measured"):
        calibrate.allocate(scores, avg_bits=4.5, candidates=["f16", "q4_0", "tcq3"])
