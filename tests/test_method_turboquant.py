"""TurboQuant (qaq_gguf.methods.turboquant): the Lloyd-Max codebook against Max's published table and qaq3/qaq2,
the quantizer against a loop-by-loop reference of Algorithms 1 and 2, bits, fingerprint, and distortion against
the paper's Theorem 1 figures. numpy only."""
import dataclasses
import math

import numpy as np
import pytest

from conftest import synthetic_calibration
from qaq_gguf import methods, quants
from qaq_gguf.methods import MethodError, turboquant as tq

# J. Max, "Quantizing for minimum distortion" (1960), N(0, 1): positive output levels and the MSE
MAX_TABLE = {
    1: ([0.7979], 0.3634),
    2: ([0.4528, 1.510], 0.1175),
    3: ([0.2451, 0.7560, 1.344, 2.152], 0.03454),
    4: ([0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733], 0.009497),
}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_matches_max_table(bits):
    levels, thr = tq.lloyd_max(bits)
    ref, mse = MAX_TABLE[bits]
    np.testing.assert_allclose(levels[len(levels) // 2:], ref, atol=6e-4)
    np.testing.assert_allclose(levels, -levels[::-1], atol=1e-12)  # symmetric
    np.testing.assert_allclose(thr, (levels[:-1] + levels[1:]) / 2)
    x = np.random.default_rng(bits).standard_normal(400_000)
    got = np.mean((levels[np.searchsorted(thr, x)] - x) ** 2)
    assert got == pytest.approx(mse, rel=0.02)


def test_qaq_types_use_the_same_levels():
    """qaq3 / qaq2 are the 3- and 2-bit Gaussian Lloyd-Max levels scaled to +-127 (the docstring's claim)."""
    for name, bits in (("qaq3", 3), ("qaq2", 2)):
        levels, _ = tq.lloyd_max(bits)
        np.testing.assert_array_equal(np.round(levels / levels[-1] * 127), quants.KVALUES[name])


def test_rotation_is_orthogonal_and_seeded():
    r = tq.rotation(32, 5)
    np.testing.assert_allclose(r @ r.T, np.eye(32), atol=1e-12)
    np.testing.assert_array_equal(r, tq.rotation(32, 5))
    assert not np.allclose(r, tq.rotation(32, 6))


def _reference(x, bits, prod, seed):
    """Algorithms 1 (TurboQuant_mse) and 2 (TurboQuant_prod), loop by loop, for one vector, norm in fp16."""
    d = len(x)
    rot = tq.rotation(d, seed)
    norm = math.sqrt(sum(v * v for v in x))
    u = [v / norm for v in x]

    def mse(u, b):
        levels = [c / math.sqrt(d) for c in tq.lloyd_max(b)[0]]
        y = [sum(rot[i, j] * u[j] for j in range(d)) for i in range(d)]  # Pi u
        yq = [min(levels, key=lambda c: abs(c - yi)) for yi in y]       # nearest level per coordinate
        return [sum(rot[i, j] * yq[i] for i in range(d)) for j in range(d)]  # Pi^T yq

    if not prod:
        ut = mse(u, bits)
    else:
        um = mse(u, bits - 1)
        r = [a - b for a, b in zip(u, um)]
        gamma = float(np.float16(math.sqrt(sum(v * v for v in r))))
        s = tq.qjl_matrix(d, seed)
        z = [1.0 if sum(s[i, j] * r[j] for j in range(d)) > 0 else -1.0 for i in range(d)]
        ut = [um[j] + math.sqrt(math.pi / 2) / d * gamma * sum(s[i, j] * z[i] for i in range(d)) for j in range(d)]
    return np.array(ut) * float(np.float16(norm))


@pytest.mark.parametrize("bits,prod", [(2, False), (3, False), (3, True), (2, True)])
def test_quantizer_matches_loop_reference(bits, prod):
    rng = np.random.default_rng(bits + 10 * prod)
    x = (rng.standard_normal((6, 16)) * np.linspace(0.5, 3, 16)).astype(np.float32)
    got = tq.quantize(x, bits, prod=prod, seed=2)
    ref = np.stack([_reference(row.astype(np.float64), bits, prod, 2) for row in x])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_method_round_trip():
    """Through the interface: keys use TurboQuant_prod with +qjl, values the MSE variant, at b bits."""
    calib = synthetic_calibration(n_layer=1, n_tok=64, n_ctx=64, head_dim=32)
    layer = calib.layers[0]
    pos = np.arange(64)
    for spec, kprod in (("turboquant:3", False), ("turboquant:3+qjl", True)):
        meth = methods.make(spec)[0]
        meth.fit(calib)
        meth.begin(64)
        k = meth.apply(0, "k", layer.k, pos)
        v = meth.apply(0, "v", layer.v, pos)
        for t in (0, 17, 63):
            for h in range(2):
                np.testing.assert_allclose(k[t, h], _reference(layer.k[t, h].astype(np.float64), 3, kprod, 0),
                                           rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(v[t, h], _reference(layer.v[t, h].astype(np.float64), 3, False, 0),
                                           rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tq.quantize(np.zeros((2, 8)), 3), 0)  # a zero vector stays zero


def test_bits_by_hand():
    calib = synthetic_calibration(n_layer=2, head_dim=64)
    m = methods.make("turboquant:3+qjl")[0]
    m.fit(calib)
    # d = 64: K (3-1) + 1 bits per coordinate + fp16 norm + fp16 gamma = 3 + 32/64 = 3.5; V 3 + 16/64 = 3.25
    b = m.bits(1024)
    assert (b.k, b.v) == (pytest.approx(3.5), pytest.approx(3.25))
    m2 = methods.make("turboquant:2")[0]
    m2.fit(calib)
    # d = 64: 2 + 16/64 = 2.25 for both; independent of n_ctx
    assert (m2.bits(512).k, m2.bits(512).v) == (pytest.approx(2.25), pytest.approx(2.25))


def test_fingerprint_refused():
    calib = synthetic_calibration(n_layer=1)
    m = methods.make("turboquant:3")[0]
    with pytest.raises(MethodError, match="not fitted"):
        methods.check_fitted(m, calib.ident)
    m.fit(calib)
    methods.check_fitted(m, calib.ident)
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(m, dataclasses.replace(calib.ident, fingerprint="another-model"))


def test_settings():
    assert [m.label for m in methods.make("turboquant")] == ["turboquant:2", "turboquant:3", "turboquant:4",
                                                             "turboquant:3+qjl"]
    for bad in ("turboquant:x", "turboquant:1+qjl", "turboquant:3+kv", "turboquant:0"):
        with pytest.raises(MethodError):
            methods.make(bad)


def test_distortion_falls_with_bits_as_theorem_1():
    """E||u - u~||^2 of unit vectors: about 0.36, 0.117, 0.03, 0.009 for b = 1..4 (paper, Theorem 1), falling;
    TurboQuant_prod's inner products are unbiased and their error falls with b."""
    rng = np.random.default_rng(0)
    d = 128
    x = rng.standard_normal((2000, d)) * np.linspace(0.2, 3, d)  # anisotropic: the rotation makes it isotropic
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = [float(np.mean(np.sum((tq.quantize(u, b).astype(np.float64) - u) ** 2, axis=1))) for b in (1, 2, 3, 4)]
    np.testing.assert_allclose(dist, [0.363, 0.117, 0.0345, 0.0095], rtol=0.08)
    assert dist[0] > dist[1] > dist[2] > dist[3]
    q = rng.standard_normal(d)
    exact = u @ q
    errs = []
    for b in (2, 3, 4):
        est = np.stack([tq.quantize(u[:50], b, prod=True, seed=s).astype(np.float64) @ q for s in range(80)])
        err = est - exact[:50]
        se = err.std(axis=0) / math.sqrt(len(est))
        assert np.all(np.abs(err.mean(axis=0)) < 4.5 * se + 2e-3)  # unbiased (up to the fp16 norms)
        errs.append(float(np.sqrt(np.mean(err ** 2))))
    assert errs[0] > errs[1] > errs[2]
