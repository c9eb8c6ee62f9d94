"""Trellis-coded quantization (qaq_gguf.methods.tcq): the Viterbi walk against brute force over every input sequence,
the stored code decodes to the same walk, the computed codebook beats the scalar code on Gaussian rows, the round
trip against a loop-by-loop reference, bits, settings, the method through its public interface. numpy only."""
import dataclasses
import itertools

import numpy as np
import pytest

from conftest import synthetic_calibration
from qaq_gguf import methods, scoring, trellis
from qaq_gguf.methods import MethodError, tcq


def _brute(x, table, k):
    """The least squared error walk of each row of x by trying every input sequence from state 0."""
    L = len(table).bit_length() - 1
    best = []
    for row in x:
        costs = []
        for seq in itertools.product(range(1 << k), repeat=len(row)):
            st = trellis.states_from_inputs(np.array([seq]), k, L)[0]
            costs.append((float(np.sum((table[st] - row) ** 2)), st))
        best.append(min(costs, key=lambda c: c[0]))
    return best


@pytest.mark.parametrize("L,k", [(4, 2), (5, 3), (6, 2)])
def test_viterbi_is_the_least_error_walk(L, k):
    rng = np.random.default_rng(L * 10 + k)
    table = rng.standard_normal(1 << L).astype(np.float32)
    d = 5 if k == 2 else 4
    x = rng.standard_normal((6, d)).astype(np.float32)
    st = trellis.viterbi(x, table, k)
    for row, got, (cost, _) in zip(x, st, _brute(x, table, k)):
        assert float(np.sum((table[got] - row) ** 2)) == pytest.approx(cost, rel=1e-5)
    # the walk is a real walk of the trellis from state 0: its k-bit inputs rebuild it
    np.testing.assert_array_equal(trellis.states_from_inputs(trellis.walk_inputs(st, k), k, L), st)


def test_viterbi_batches_agree_with_one_batch(monkeypatch):
    table, _ = trellis.codebook(2, 6)
    x = np.random.default_rng(3).standard_normal((40, 16)).astype(np.float32)
    whole = trellis.viterbi(x, table, 2)
    monkeypatch.setattr(trellis, "_BP_BYTES", 16 * 16 * 3)  # 3 rows per batch
    np.testing.assert_array_equal(trellis.viterbi(x, table, 2), whole)


@pytest.mark.parametrize("k,L,scalar", [(3, 6, 0.0345), (2, 6, 0.1175)])
def test_codebook_beats_the_lloyd_max_scalar_code(k, L, scalar):
    """Distortion per value on N(0, 1) rows below the k-bit Lloyd-Max scalar code's (0.0345 at 3 bits, 0.1175 at
    2), start state included."""
    table, rho = trellis.codebook(k, L)
    assert len(table) == 1 << L and np.all(np.isfinite(table))
    x = np.random.default_rng(7).standard_normal((400, 64)).astype(np.float32)
    st = trellis.viterbi(x * rho, table, k)
    mse = float(np.mean((table[st] / rho - x) ** 2))
    assert mse < 0.9 * scalar, mse


def _reference(x, k, L, is_v, factors=tcq.SCALE_FACTORS):
    """Loop-by-loop: rotate a row, walk it (trellis.viterbi, checked above), least-squares fp16 scale, rotate back."""
    table, rho = trellis.codebook(k, L)
    d = x.shape[-1]
    r = scoring.rotation_size(d, is_v)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = (scoring.rotate(x[idx][None], r)[0] if r else x[idx]).astype(np.float64)
        rms = np.sqrt(np.mean(row.astype(np.float64) ** 2))
        cands = []
        for f in factors:
            st = trellis.viterbi((row / (rms / rho * f))[None], table, k)[0]
            c = table[st].astype(np.float64)
            y = np.float16(np.dot(row, c) / np.dot(c, c)).astype(np.float64) * c
            cands.append((float(np.sum((y - row) ** 2)), y))
        y = min(cands, key=lambda e: e[0])[1].astype(np.float32)
        out[idx] = scoring.rotate(y[None], r)[0] if r else y
    return out


@pytest.mark.parametrize("d,is_v", [(64, False), (128, True), (80, False)])
def test_round_trip_matches_the_reference(d, is_v):
    x = (np.random.default_rng(d).standard_normal((3, 2, d)) * 2 + 0.3).astype(np.float32)
    got = tcq.quantize(x, 3, 6, is_v=is_v)
    np.testing.assert_allclose(got, _reference(x, 3, 6, is_v), rtol=1e-4, atol=1e-5)
    one = tcq.quantize(x, 3, 6, is_v=is_v, factors=tcq.WALKS[1])  # one walk: never better than the best of five
    np.testing.assert_allclose(one, _reference(x, 3, 6, is_v, tcq.WALKS[1]), rtol=1e-4, atol=1e-5)
    assert np.sum((one - x) ** 2) >= np.sum((got - x) ** 2) * (1 - 1e-6)
    assert np.mean((got - x) ** 2) < 0.05 * np.mean(x ** 2)
    z = np.zeros((2, 1, d), np.float32)  # an all-zero row stays zero (no division by a zero scale)
    np.testing.assert_array_equal(tcq.quantize(z, 3, 6, is_v=is_v), z)


def test_bits_settings_and_fingerprint():
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=16, n_ctx=16)
    m = methods.make("tcq:3/L6")[0]
    with pytest.raises(MethodError, match="not fitted"):
        m.bits(512)
    m.fit(calib)
    assert (m.bits(512).k, m.bits(512).v) == (pytest.approx(3.25), pytest.approx(3.25))
    methods.check_fitted(m, calib.ident)
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(m, dataclasses.replace(calib.ident, fingerprint="another-model"))
    y = m.apply(0, "k", calib.layers[0].k[:4], calib.layers[0].pos[:4])
    assert y.shape == calib.layers[0].k[:4].shape
    assert "us per row" in m.bits(512).detail  # the encode cost it measured
    assert [x.label for x in methods.make("tcq")] == ["tcq:3", "tcq:2"]
    assert methods.make("tcq:2/L12")[0].label == "tcq:2/L12"
    one = methods.make("tcq:3/L6/w1")[0]
    assert one.label == "tcq:3/L6/w1" and tcq.WALKS[one.walks] == (1.0,)
    for bad in ("tcq:5", "tcq:3/L3", "tcq:3/L20", "tcq:x", "tcq:3/b32", "tcq:3/w2"):
        with pytest.raises(MethodError):
            methods.make(bad)


def test_c_encoders_of_the_cost_benchmark_walk_as_numpy(tmp_path):
    """tools/tcq_cost.py times C Viterbi encoders: each must find exactly the walks of numpy's rule it
    follows (plain C: trellis.viterbi; AVX2: trellis.viterbi(tagged=True)), else it times a wrong encoder."""
    import importlib.util
    import shutil
    from pathlib import Path

    if not shutil.which("cc"):
        pytest.skip("no C compiler (cc)")
    spec = importlib.util.spec_from_file_location("tcq_cost", Path(__file__).parent.parent / "tools" /
                                                  "tcq_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lib = mod.build_encoder(tmp_path)
    avx2 = (False, True) if hasattr(lib, "tcq_encode_avx2") else (False,)
    for L, d in ((6, 64), (8, 256)):
        for a in avx2:
            assert mod.check(lib, 3, L, d, a) == 0
    table, _ = trellis.codebook(2, 6)
    x = np.random.default_rng(5).standard_normal((8, 16)).astype(np.float32)
    for a in avx2:
        np.testing.assert_array_equal(mod.encode(lib, x, table, 2, a), trellis.viterbi(x, table, 2, tagged=a))
    if True in avx2:
        with pytest.raises(ValueError, match="AVX2 encoder"):
            mod.encode(lib, x, trellis.codebook(2, 5)[0], 2, True)


def test_tagged_walks_are_as_good_as_plain_ones():
    """The native encoder's rule (the argmin in the costs' low bits) walks like the plain Viterbi but for near-ties:
    per row the same squared error to float32 precision, and the same states in most rows."""
    for k, L in ((3, 8), (2, 6)):
        table, rho = trellis.codebook(k, L)
        x = (np.random.default_rng(7).standard_normal((256, 64)) * rho).astype(np.float32)
        plain, tagged = trellis.viterbi(x, table, k), trellis.viterbi(x, table, k, tagged=True)
        ep = np.sum((table[plain] - x) ** 2, axis=1)
        et = np.sum((table[tagged] - x) ** 2, axis=1)
        np.testing.assert_allclose(et, ep, rtol=1e-5)
        assert np.mean(np.all(plain == tagged, axis=1)) > 0.9
        np.testing.assert_array_equal(trellis.states_from_inputs(trellis.walk_inputs(tagged, k), k, L), tagged)


def test_rebalance_is_exact_for_attention_and_balances_the_pairs():
    """/rb: queries divided by what the keys are multiplied by, per RoPE pair (q.k unchanged before the code);
    after it the pairs' key and query rms agree up to one factor per head."""
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=128, n_ctx=64, n_head=4, n_head_kv=2)
    m = methods.make("tcq:3/w1/rb")[0]
    assert m.rewrites == {"q", "k", "v"}
    m.fit(calib)
    layer = calib.layers[1]
    d = m.pair_scale[1]
    q = np.random.default_rng(0).standard_normal((5, 4, 64)).astype(np.float32)
    qr = m.apply(1, "q", q, np.arange(5))
    k = layer.k[:5]
    for j in range(4):  # query head j reads KV head j // 2
        np.testing.assert_allclose(np.sum(qr[:, j] * k[:, j // 2] * d[j // 2], axis=-1),
                                   np.sum(q[:, j] * k[:, j // 2], axis=-1), rtol=1e-5, atol=1e-5)
    pairs = layer.rope.pairs(64)
    for h in range(2):
        np.testing.assert_array_equal(d[h, pairs[:, 0]], d[h, pairs[:, 1]])
        a = np.sqrt(layer.q_sq[h, pairs].mean(axis=1)) / d[h, pairs[:, 0]]
        b = np.sqrt(np.mean(layer.k[:, h][:, pairs] ** 2, axis=(0, 2))) * d[h, pairs[:, 0]]
        np.testing.assert_allclose(a / b, (a / b)[0], rtol=1e-6)
    assert m.apply(1, "k", k, np.arange(5)).shape == k.shape


def test_centred_keys():
    """/c: the keys less their calibration mean (as cached) are coded; the values are not touched by it."""
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=128, n_ctx=64)
    m = methods.make("tcq:3/L6/w1/c")[0]
    m.fit(calib)
    layer = calib.layers[0]
    mean = layer.k.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(m.key_mean[0], mean, rtol=1e-5, atol=1e-5)
    k = layer.k[:6]
    np.testing.assert_array_equal(m.apply(0, "k", k, layer.pos[:6]),
                                  tcq.quantize(k - m.key_mean[0], 3, 6, is_v=False, factors=tcq.WALKS[1]))
    v = layer.v[:6]
    np.testing.assert_array_equal(m.apply(0, "v", v, layer.pos[:6]),
                                  tcq.quantize(v, 3, 6, is_v=True, factors=tcq.WALKS[1]))
    assert methods.make("tcq:3/w1/c/rb")[0].label == "tcq:3/w1/c/rb"


def test_exact_first_position():
    """/x: rows at position 0 come back as they went in (after /c, /rb: the cache's own form), the statistics leave
    them out, and the exact cell's two f16 rows are counted."""
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=128, n_ctx=64)
    layer = calib.layers[1]
    assert np.sum(layer.pos == 0) == 2
    m = methods.make("tcq:3/w1/c/rb/x")[0]
    assert (m.centre, m.rebalance, m.exact, m.label) == (True, True, True, "tcq:3/w1/c/rb/x")
    m.fit(calib)
    keep = layer.pos != 0
    np.testing.assert_allclose(m.key_mean[1], layer.k[keep].astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m.pair_scale[1], tcq.rebalance_scales(methods.without_first(layer), m.key_mean[1]))
    k, pos = layer.k[60:70], layer.pos[60:70]
    got = m.apply(1, "k", k, pos)
    kc = (k - m.key_mean[1]) * m.pair_scale[1]
    first = pos == 0
    np.testing.assert_array_equal(got[first], kc[first].astype(np.float32))
    np.testing.assert_array_equal(got[~first], tcq.quantize(kc, 3, 8, is_v=False, factors=(1.0,))[~first])
    v = layer.v[60:70]
    np.testing.assert_array_equal(m.apply(1, "v", v, pos)[first], v[first])
    plain = methods.make("tcq:3/w1/c/rb")[0]
    plain.fit(calib)
    assert m.bits(512).k == pytest.approx(plain.bits(512).k + 2 * 16 / 512)
    assert m.bits(512).v == pytest.approx(plain.bits(512).v + 2 * 16 / 512)
    assert "position 0 exact" in m.bits(512).detail
    for bad in ("3/x/c", "3/rb/c", "3/x/x"):
        with pytest.raises(MethodError, match="tcq"):
            methods.make(f"tcq:{bad}")


def test_ue5m3_row_scale():
    """/s8: each row is a ue5m3 value (qaq3's scale byte) times the codewords of a walk, the better of the two bytes
    around the least-squares scale; 3 + 8/d bits; a little more error than the fp16 scale, never a lot."""
    from qaq_gguf import quants, scoring
    x = (np.random.default_rng(4).standard_normal((200, 1, 64)) * 3).astype(np.float32)
    y8 = tcq.quantize(x, 3, 8, is_v=True, factors=(1.0,), scale8=True)
    y16 = tcq.quantize(x, 3, 8, is_v=True, factors=(1.0,))
    table, _ = trellis.codebook(3, 8)
    yr = scoring.rotate(y8, 64).reshape(-1, 64).astype(np.float64)
    scales = quants.ue5m3_to_float(np.arange(1, quants.UE5M3_MAX + 1)).astype(np.float64)
    for row in yr[:20]:  # some ue5m3 scale times codewords gives every value of the row
        fits = [sc for sc in scales if np.all(np.min(np.abs(row[:, None] / sc - table[None]), axis=1) < 1e-5)]
        assert len(fits) >= 1
    e8, e16 = np.sum((y8 - x) ** 2), np.sum((y16 - x) ** 2)
    assert e16 < e8 < 1.1 * e16
    calib = synthetic_calibration(n_layer=2, head_dim=64, n_tok=16, n_ctx=16)
    m = methods.make("tcq:3/s8/w1")[0]
    m.fit(calib)
    assert m.label == "tcq:3/s8/w1" and m.bits(512).k == pytest.approx(3.125) and "ue5m3" in m.bits(512).detail
    with pytest.raises(MethodError):
        methods.make("tcq:3/w1/s8")


def test_row_scale_rules():
    """/u: each row's reconstruction has the row itself as its component along the row (to the fp16 scale), where the
    least-squares scale shrinks it by about the code's relative error; the squared error rises a little. /u<P> caps
    the unshrunk scale at P% above least squares; /n makes the reconstruction as long as the row."""
    x = (np.random.default_rng(6).standard_normal((300, 1, 64)) * 2).astype(np.float32)
    q = lambda rule: tcq.quantize(x, 2, 8, is_v=True, factors=(1.0,), rule=rule)  # noqa: E731
    yu, yl, yc, yn = q("u"), q(""), q("u3"), q("n")
    along = lambda y: np.sum(y * x, axis=-1) / np.sum(x * x, axis=-1)  # noqa: E731
    norm = lambda y: np.linalg.norm(y, axis=-1) / np.linalg.norm(x, axis=-1)  # noqa: E731
    np.testing.assert_allclose(along(yu), 1.0, atol=2.0 ** -10)
    assert np.mean(along(yl)) < 0.95  # 2 bits: about 9% shrinkage
    np.testing.assert_allclose(along(yc), np.minimum(1.0, along(yl) * 1.03), atol=2.0 ** -10)  # the cap binds here
    np.testing.assert_allclose(norm(yn), 1.0, atol=2.0 ** -10)
    assert np.all(along(yl) < along(yn) + 2.0 ** -10) and np.all(along(yn) < along(yu) + 2.0 ** -10)
    eu, el = np.sum((yu - x) ** 2), np.sum((yl - x) ** 2)
    assert el < eu < 1.1 * el
    for setting, rule in (("tcq:3/w1/c/rb/x/u", "u"), ("tcq:3/w1/u5", "u5"), ("tcq:3/w1/n", "n"), ("tcq:3", "")):
        m = methods.make(setting)[0]
        assert m.rule == rule and m.label == setting
    for bad in ("tcq:3/u/x", "tcq:3/n5", "tcq:3/un"):
        with pytest.raises(MethodError):
            methods.make(bad)
