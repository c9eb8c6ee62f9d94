"""QAQ (qaq_gguf.methods.qaq) on synthetic activations: the module against a loop-based reference written from the
paper's/code's formulas, its bits accounting by hand, the fingerprint check, and the matched-bits settings."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from conftest import synthetic_calibration

from qaq_gguf import methods
from qaq_gguf.methods import MethodError, qaq


def run_sequence(m, q, k, v, n_batch):
    """Drive the method as the lab's rewriter does (refresh before each batch, then q, k, v per layer) over an
    f16-like cache that stores what apply returns and what refresh rewrites; returns the cache per layer."""
    n = q[0].shape[0]
    cache = {il: {"k": np.zeros_like(k[il]), "v": np.zeros_like(v[il])} for il in q}
    m.begin(n)
    snapshots = []
    for p0 in range(0, n, n_batch):
        for u in m.refresh(p0):
            cache[u.il][u.kind][u.pos] = u.values
        pos = np.arange(p0, min(p0 + n_batch, n))
        for il in q:
            m.apply(il, "q", q[il][pos], pos)
            cache[il]["k"][pos] = m.apply(il, "k", k[il][pos], pos)
            cache[il]["v"][pos] = m.apply(il, "v", v[il][pos], pos)
        snapshots.append({il: {kind: c[kind][:pos[-1] + 1].copy() for kind in c} for il, c in cache.items()})
    return cache, snapshots


# --- the reference: one token at a time, straight from the formulas ------------------------------------------------

def ref_quantize(x, B, alpha):
    """One group (head_dim values): outliers by the code's ranks, mean/range of the rest, fp16 mean and step,
    q = clamp(round((x - mean) / step), -2^(B-1), 2^(B-1) - 1)."""
    x = [float(np.float16(a)) for a in x]
    d = len(x)
    srt = sorted(x)
    if alpha > 0:
        lo = srt[int(math.ceil(alpha / 2 * d)) - 1]
        hi = srt[int(math.floor((1 - alpha / 2) * d)) - 1]
        out = [a <= lo or a > hi for a in x]
    else:
        out = [False] * d
    rest = [a for a, o in zip(x, out) if not o]
    mean = float(np.float16(sum(rest) / len(rest)))
    step = float(np.float16(np.float32(max(rest) - min(rest)) / np.float32(2 ** B)))
    y = []
    for a, o in zip(x, out):
        if o:
            y.append(a)
        elif B == 0 or step == 0:
            y.append(mean)
        else:
            c = min(max(round((a - mean) / step), -2 ** (B - 1)), 2 ** (B - 1) - 1)
            y.append(float(np.float32(c) * np.float32(step) + np.float32(mean)))
    return np.array(y, np.float32), max(rest) - min(rest)


def ref_bits(ratio, bmin, bmax):
    return min(max(math.ceil(math.log2(ratio + 1)), bmin), bmax)


def ref_key_bits(rng, T, qn, eps, bmin, bmax):
    if T <= 1:
        return bmin
    err = math.sqrt(12 / qn * math.log(T ** 3 / (T - 1) * eps ** 2 + 1))
    return ref_bits(rng / (2 * err), bmin, bmax)


def ref_value_bits(rng, A, T, eps, bmin, bmax):
    if A == 0:
        return bmin
    err = math.sqrt(12 / T) * eps / A
    return ref_bits(rng / (2 * err), bmin, bmax)


def ref_attention(q, k, s, j, h, g, n_swa):
    """softmax over keys 0..j of query j, head h (kv head g), in float64; 0 outside the causal/sliding window."""
    vis = [t for t in range(j + 1) if not n_swa or j - t < n_swa]
    z = {t: s * float(np.dot(q[j, h].astype(np.float64), k[t, g].astype(np.float64))) for t in vis}
    mx = max(z.values())
    e = {t: math.exp(a - mx) for t, a in z.items()}
    tot = sum(e.values())
    return {t: e[t] / tot for t in vis}


class Reference:
    """QAQ for one layer, token by token: bits at a state (after query `state`), quantization, the batch rules."""

    def __init__(self, m, il, cl, n_swa, q, k, v):
        self.m, self.cl, self.n_swa = m, cl, n_swa
        self.q = q  # queries as given (keys and values: the fp16 shadow copy)
        self.k = k.astype(np.float16).astype(np.float32)
        self.v = v.astype(np.float16).astype(np.float32)
        self.hkv, self.grp = k.shape[1], cl.n_head // k.shape[1]
        self.qn = [float(np.percentile(cl.q_norm2[:, g * self.grp:(g + 1) * self.grp], 90)) for g in range(self.hkv)]

    def T(self, T):
        return min(T, self.n_swa) if self.n_swa else T

    def bits(self, t, g, T, rows, forced):
        """Key and value bits of token t, head g, with T tokens and window query rows."""
        m = self.m
        if forced:
            return m.bmax, m.bmax
        _, rk = ref_quantize(self.k[t, g], 0, m.alpha)
        _, rv = ref_quantize(self.v[t, g], 0, m.alpha)
        A = 0.0
        for j in rows:
            for h in range(g * self.grp, (g + 1) * self.grp):
                A = max(A, ref_attention(self.q, self.k, self.cl.kq_scale, j, h, g, self.n_swa).get(t, 0.0))
        return (ref_key_bits(rk, self.T(T), self.qn[g], m.eps, m.bmin, m.bmax),
                ref_value_bits(rv, A, self.T(T), m.eps, m.bmin, m.bmax))

    def store(self, cache, t, bk, bv):
        for g in range(self.hkv):
            cache["k"][t, g] = ref_quantize(self.k[t, g], bk[g], self.m.alpha)[0]
            cache["v"][t, g] = ref_quantize(self.v[t, g], bv[g], self.m.alpha)[0]

    def run(self, n_batch):
        n, n_win = self.k.shape[0], self.m.n_win
        cache = {"k": np.zeros_like(self.k), "v": np.zeros_like(self.v)}
        snaps = []
        for p0 in range(0, n, n_batch):
            # refresh: every token a later query can still see, at the state after query p0 - 1
            for t in range(p0):
                if self.n_swa and t <= p0 - self.n_swa:
                    continue
                rows = range(max(0, p0 - n_win), p0)
                b = [self.bits(t, g, p0, rows, t >= p0 - n_win + 1 and n_win > 1) for g in range(self.hkv)]
                self.store(cache, t, [x[0] for x in b], [x[1] for x in b])
            end = min(p0 + n_batch, n)
            # the batch: token t at the state after query t + n - 1 (its first n scores, T = t + n)
            for t in range(p0, end):
                forced = t + n_win - 1 > end - 1
                rows = range(t, t + n_win)
                b = [self.bits(t, g, t + n_win, rows, forced) for g in range(self.hkv)]
                self.store(cache, t, [x[0] for x in b], [x[1] for x in b])
            snaps.append({kind: cache[kind][:end].copy() for kind in cache})
        return snaps


def sequence(calib, seed, n):
    rng = np.random.default_rng(seed)
    q, k, v = {}, {}, {}
    for il, cl in calib.layers.items():
        hkv, d = cl.k.shape[1], cl.k.shape[2]
        q[il] = (rng.standard_normal((n, cl.n_head, d)) * 3).astype(np.float32)
        k[il] = (rng.standard_normal((n, hkv, d)) * np.linspace(0.5, 3, d)).astype(np.float32)
        v[il] = rng.standard_normal((n, hkv, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("setting", ["3", "paper/eps=0.3/min=1/max=4", "4/n=1/alpha=0"])
def test_round_trip_matches_loop_reference(setting):
    cal = synthetic_calibration(n_layer=2, n_tok=128, n_ctx=64, n_head=4, n_head_kv=2, head_dim=16, seed=3)
    cal.ident = dataclasses.replace(cal.ident, is_swa=[False, True], n_swa=12)  # layer 1: sliding window of 12
    m = qaq.make(setting)
    m.fit(cal)
    q, k, v = sequence(cal, 7, 40)
    cache, snaps = run_sequence(m, q, k, v, n_batch=16)  # batches at 0, 16, 32 (the last one of 8 tokens)
    for il in (0, 1):
        ref = Reference(m, il, cal.layers[il], 12 if il == 1 else 0, q[il], k[il], v[il]).run(16)
        for b, (got, want) in enumerate(zip(snaps, ref)):
            for kind in ("k", "v"):
                np.testing.assert_allclose(got[il][kind], want[kind], rtol=0, atol=1e-6,
                                           err_msg=f"layer {il} {kind} after batch {b}")
        # the cache holds exactly what the method says it stores
        for kind in ("k", "v"):
            np.testing.assert_array_equal(cache[il][kind], m.stored(il, kind))
    # the quantization did something: errors, and more than one bit width in use
    assert np.abs(cache[0]["k"] - k[0]).max() > 0
    assert len(np.unique(m._state[0].v.B)) > 1


def test_refresh_rewrites_only_changed_tokens():
    cal = synthetic_calibration(n_layer=1, n_tok=128, n_ctx=64, n_head=2, n_head_kv=1, head_dim=32)
    m = qaq.make("paper")
    m.fit(cal)
    q, k, v = sequence(cal, 1, 64)
    m.begin(64)
    assert m.refresh(0) == []
    pos = np.arange(32)
    m.apply(0, "q", q[0][pos], pos), m.apply(0, "k", k[0][pos], pos), m.apply(0, "v", v[0][pos], pos)
    before = {kind: m._state[0].k.B[:32].copy() if kind == "k" else m._state[0].v.B[:32].copy() for kind in "kv"}
    ups = m.refresh(32)
    for u in ups:
        assert u.values.shape == (len(u.pos), 1, 32)
        now = (m._state[0].k if u.kind == "k" else m._state[0].v).B[u.pos]
        assert np.all(np.any(now != before[u.kind][u.pos], axis=1))
    assert ups  # tokens stored early in the batch (state t + 4) are re-quantized at the state after query 31
    assert m.refresh(32) == []  # nothing changed since


def test_bits_accounting_by_hand():
    # head_dim 16, one KV head, 4 tokens, window n = 3, eps huge: tokens 0 and 1 at n_bits_min = 2 (their ranges
    # are tiny next to any error bound), tokens 2 and 3 (the newest n-1) forced to n_bits_max = 4.
    # alpha 1% of 16: ranks ceil(0.08) = 1 and floor(15.92) = 15 -> 2 outliers per group, index ceil(log2 16) = 4.
    # group = B * (16 - 2) + 2 * 16 (mean, step) + 2 * (16 + 4) = 14 B + 72 bits
    #   B=2: 100, B=4: 128; per sequence 2 * 100 + 2 * 128 = 456 bits over 4 * 16 = 64 values = 7.125 bits/value.
    # alpha 0: group = 16 B + 32: 2 * 64 + 2 * 96 = 320 / 64 = 5.0 bits/value.
    cal = synthetic_calibration(n_layer=1, n_tok=64, n_ctx=32, n_head=1, n_head_kv=1, head_dim=16)
    rng = np.random.default_rng(5)
    for setting, want in (("paper/eps=1e30/min=2/max=4/n=3", 7.125), ("paper/eps=1e30/min=2/max=4/n=3/alpha=0", 5.0)):
        m = qaq.make(setting)
        m.fit(cal)
        before = m.bits(4)  # before any evaluation: calibration's measurement
        assert "calibration" in before.detail and math.isfinite(before.k)
        for _ in range(2):  # two sequences, averaged
            q = {0: rng.standard_normal((4, 1, 16)).astype(np.float32)}
            k = {0: (rng.random((4, 1, 16)) * 0.01).astype(np.float32)}
            v = {0: (rng.random((4, 1, 16)) * 0.01).astype(np.float32)}
            run_sequence(m, q, k, v, n_batch=4)
            assert m._state[0].k.B[:, 0].tolist() == [2, 2, 4, 4]
        b = m.bits(4)
        assert b.k == pytest.approx(want) and b.v == pytest.approx(want)
        assert "2 sequence(s)" in b.detail and "shadow copy" in b.detail and "not counted" in b.detail


def test_refused_on_another_model():
    m = qaq.make("3")
    with pytest.raises(MethodError):
        methods.check_fitted(m, synthetic_calibration().ident)  # not fitted
    m.fit(synthetic_calibration(fingerprint="model-a"))
    methods.check_fitted(m, synthetic_calibration(fingerprint="model-a").ident)
    with pytest.raises(MethodError):
        methods.check_fitted(m, synthetic_calibration(fingerprint="model-b").ident)


def test_matched_bits_land_near_targets_and_more_bits_less_error():
    cal = synthetic_calibration(n_layer=2, n_tok=512, n_ctx=256, n_head=4, n_head_kv=1, head_dim=256, seed=1)
    q, k, v = sequence(cal, 11, 256)
    errs, measured = [], []
    for target in ("2", "3", "4"):
        m = qaq.make(target)
        m.fit(cal)
        b = m.bits(256)  # calibration's measurement
        assert b.average(1, 1) == pytest.approx(float(target), abs=0.05), b.detail
        cache, _ = run_sequence(m, q, k, v, n_batch=64)
        errs.append(sum(float(np.mean((cache[il][kind] - x[il]) ** 2)) for il in cache for kind, x in
                        (("k", k), ("v", v))))
        measured.append(m.bits(256).average(1, 1))
        assert m.fingerprint == cal.ident.fingerprint
    assert errs[0] > errs[1] > errs[2]
    assert measured[0] < measured[1] < measured[2]


def test_settings():
    assert [m.label for m in methods.make("qaq")] == ["qaq:2", "qaq:3", "qaq:4"]
    m = methods.make("qaq:paper")[0]
    assert (m.eps, m.bmin, m.bmax, m.alpha, m.n_win) == (1.0, 0, 4, 0.01, 5)
    assert m.rewrites == {"k", "v"} and "q" in m.observes and m.paper == "QAQ, arXiv 2403.04643"
    for bad in ("x", "3/eps=1", "paper/foo=1", "paper/min=5/max=4", "paper,eps=1"):
        with pytest.raises(MethodError):
            qaq.make(bad)
    with pytest.raises(MethodError):
        qaq.make("3").apply(0, "k", np.zeros((1, 1, 8), np.float32), np.zeros(1, np.int64))  # not fitted
