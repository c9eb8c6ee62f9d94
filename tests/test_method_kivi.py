"""KIVI (qaq_gguf.methods.kivi): per-channel keys and per-token values in groups of 32, an fp16 residual refreshed
into quantized form; checked against a loop-based reference written from the paper's description."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import synthetic_calibration

from qaq_gguf import methods
from qaq_gguf.methods import MethodError, kivi


# --- a reference written from the paper (arXiv 2402.02750 section 3), one value at a time ------------------------

def _asym(seg: np.ndarray, bits: int) -> np.ndarray:
    """Asymmetric min/max round-to-nearest of one group: scale (max - min) / (2^b - 1), zero point min."""
    lo, hi = seg.min(), seg.max()
    levels = np.float32(2 ** bits - 1)
    scale = (hi - lo) / levels
    if scale == 0:
        return seg.copy()
    out = np.empty_like(seg)
    for i, x in enumerate(seg):
        q = min(max(np.round((x - lo) / scale), 0), levels)
        out[i] = q * scale + lo
    return out


def ref_keys(x: np.ndarray, bits: int, g: int = 32) -> np.ndarray:
    """Per channel, over groups of g consecutive tokens (positions 0.. of the sequence)."""
    n, h, d = x.shape
    out = np.empty_like(x)
    for hh in range(h):
        for c in range(d):
            for t0 in range(0, n, g):
                out[t0:t0 + g, hh, c] = _asym(x[t0:t0 + g, hh, c], bits)
    return out


def ref_values(x: np.ndarray, bits: int, g: int = 32) -> np.ndarray:
    """Per token, over groups of g consecutive channels."""
    n, h, d = x.shape
    out = np.empty_like(x)
    for t in range(n):
        for hh in range(h):
            for c0 in range(0, d, g):
                out[t, hh, c0:c0 + g] = _asym(x[t, hh, c0:c0 + g], bits)
    return out


def _kv(n=320, h=2, d=64, seed=3):
    rng = np.random.default_rng(seed)
    scale = np.ones(d, np.float32)
    scale[[3, 17]] = 8.0  # outlier channels, as keys have
    k = (rng.standard_normal((n, h, d)) * scale + 0.3).astype(np.float32)
    v = rng.standard_normal((n, h, d)).astype(np.float32)
    return k, v


def _fitted(setting: str, **kw):
    m = kivi.make(setting)
    m.fit(synthetic_calibration(**kw))
    return m


def _run(m, k, v, n_batch, il=0):
    """Drive the method as rewrite.Rewriter does: refresh before each batch (writing its updates into a cache with
    cell = position), then apply; returns the cache after each batch start (before apply) and at the end."""
    n = k.shape[0]
    cache = {"k": np.full_like(k, np.nan), "v": np.full_like(v, np.nan)}
    states = []
    m.begin(n)
    for p0 in range(0, n, n_batch):
        for u in m.refresh(p0):
            assert u.il == il
            cache[u.kind][u.pos] = u.values
        states.append((p0, cache["k"].copy(), cache["v"].copy()))
        pos = np.arange(p0, min(p0 + n_batch, n))
        cache["k"][pos] = m.apply(il, "k", k[pos], pos)
        cache["v"][pos] = m.apply(il, "v", v[pos], pos)
    return states, cache


# --- (a) round trip against the reference ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_all_quantized_matches_reference(bits):
    """r0: every token quantized as written; per-channel key groups of 32 tokens, per-token value groups of 32."""
    k, v = _kv(n=256)
    m = _fitted(f"{bits}:r0")
    m.begin(256)
    pos = np.arange(256)
    np.testing.assert_allclose(m.apply(0, "k", k, pos), ref_keys(k, bits), rtol=0, atol=1e-5)
    np.testing.assert_allclose(m.apply(0, "v", v, pos), ref_values(v, bits), rtol=0, atol=1e-5)


def test_unaligned_batches_group_keys_by_position():
    """Key groups follow positions (pos // 32), not the batch: a batch split inside a group quantizes the pieces."""
    k, _ = _kv(n=64)
    m = _fitted("2:r0")
    m.begin(64)
    a = m.apply(0, "k", k[:40], np.arange(40))
    np.testing.assert_allclose(a[:32], ref_keys(k[:32], 2), atol=1e-5)
    np.testing.assert_allclose(a[32:40], ref_keys(k[32:40], 2, g=8), atol=1e-5)  # the partial group on its own


# --- (e) the residual: refreshed into quantized form, the window exact --------------------------------------------

@pytest.mark.parametrize("r, n_batch", [(128, 256), (64, 64), (32, 96), (128, 100)])
def test_refresh_quantizes_tokens_leaving_the_window(r, n_batch):
    n = 512
    k, v = _kv(n=n, h=1, d=32)
    m = _fitted(f"2:r{r}")
    qk, qv = ref_keys(k, 2), ref_values(v, 2)
    states, final = _run(m, k, v, n_batch)
    for p0, ck, cv in states:
        kw = (p0 // r) * r        # keys: the residual since the last multiple of R (official llama_kivi.py)
        vw = max(0, p0 - r)       # values: the last R tokens
        np.testing.assert_allclose(ck[:kw], qk[:kw], atol=1e-5, err_msg=f"keys quantized before {p0}")
        np.testing.assert_array_equal(ck[kw:p0], k[kw:p0], err_msg=f"keys exact in the window at {p0}")
        np.testing.assert_allclose(cv[:vw], qv[:vw], atol=1e-5, err_msg=f"values quantized before {p0}")
        np.testing.assert_array_equal(cv[vw:p0], v[vw:p0], err_msg=f"values exact in the window at {p0}")
    # the last batch is written exact (the newest tokens are in the residual)
    last = states[-1][0]
    np.testing.assert_array_equal(final["k"][last:], k[last:])
    np.testing.assert_array_equal(final["v"][last:], v[last:])


def test_refresh_updates_each_token_once_and_begin_resets():
    n, r = 384, 64
    k, v = _kv(n=n)
    m = _fitted(f"3:r{r}")
    seen = {"k": [], "v": []}
    m.begin(n)
    for p0 in range(0, n, 128):
        for u in m.refresh(p0):
            seen[u.kind] += u.pos.tolist()
            assert u.values.shape == (len(u.pos),) + k.shape[1:]
        pos = np.arange(p0, p0 + 128)
        m.apply(0, "k", k[pos], pos)
        m.apply(0, "v", v[pos], pos)
    assert seen["k"] == list(range(256))        # 256 = 64 * floor(256 / 64): the keys below the last batch start
    assert seen["v"] == list(range(256 - r))
    m.begin(n)  # a new sequence: nothing left to refresh
    assert m.refresh(0) == []
    assert m.refresh(256) == []


# --- (b) bits ---------------------------------------------------------------------------------------------------

def test_bits_by_hand():
    # KIVI-2, R = 128, n_ctx = 1024, head_dim 64: a quantized value costs 2 code bits + 32/32 (an fp16 scale and
    # an fp16 zero point per group of 32) = 3 bits; 128 tokens stay fp16:
    # (896 * 3 + 128 * 16) / 1024 = (2688 + 2048) / 1024 = 4736 / 1024 = 4.625 for K and for V
    b = _fitted("2").bits(1024)
    assert b.k == pytest.approx(4.625) and b.v == pytest.approx(4.625)
    assert "4.6250" in b.detail and "32/32" in b.detail
    # r0: nothing in fp16, 2 + 1 = 3 bits; KIVI-4 r32 at 512: (480 * 5 + 32 * 16) / 512 = 2912 / 512 = 5.6875
    assert _fitted("2:r0").bits(1024).k == pytest.approx(3.0)
    assert _fitted("4:r32").bits(512).v == pytest.approx(5.6875)
    # the residual never exceeds the context: n_ctx = 64 < R = 128 -> all fp16
    assert _fitted("2").bits(64).k == pytest.approx(16.0)


# --- (c) fingerprint ------------------------------------------------------------------------------------------------

def test_refused_on_another_model():
    m = _fitted("2", fingerprint="model-a")
    ident_a = synthetic_calibration(fingerprint="model-a").ident
    methods.check_fitted(m, ident_a)
    ident_b = dataclasses.replace(ident_a, fingerprint="model-b")
    with pytest.raises(MethodError, match="fingerprint"):
        methods.check_fitted(m, ident_b)
    with pytest.raises(MethodError, match="not fitted"):
        methods.check_fitted(kivi.make("2"), ident_a)


# --- (d) more bits, less error ----------------------------------------------------------------------------------

def test_more_bits_lower_error():
    k, v = _kv(n=512, seed=5)
    pos = np.arange(512)
    err = {}
    for b in (2, 3, 4):
        m = _fitted(f"{b}:r0")
        m.begin(512)
        err[b] = (np.mean((m.apply(0, "k", k, pos) - k) ** 2), np.mean((m.apply(0, "v", v, pos) - v) ** 2))
    assert err[2][0] > err[3][0] > err[4][0] > 0
    assert err[2][1] > err[3][1] > err[4][1] > 0


# --- settings -------------------------------------------------------------------------------------------------------

def test_settings():
    ms = methods.make("kivi")
    assert [m.label for m in ms] == ["kivi-2 r128", "kivi-3 r128", "kivi-4 r128"]
    assert kivi.make("2:r32").label == "kivi-2 r32"
    assert "38.30" in ms[0].headline and "38.79" in ms[2].headline
    assert ms[0].rewrites == {"k", "v"}
    for bad in ("", "x", "2:r33", "2:q5", "0"):
        with pytest.raises(MethodError):
            kivi.make(bad)
