"""Bit-shift trellises (QTIP, arXiv 2406.11235): the Viterbi walk, the walk's inputs and states, and the computed
Gaussian codebooks. One home for the trellis math of the lab's ``tcq`` method (``methods/tcq.py``) and of the
native trellis-coded cache types ``tcq3`` / ``tcq2`` (``quants.py``, ``native/ggml/ggml-qaq-common.h``).

A walk through 2^L states shifts k bits per value into its state, ``s_t = ((s_{t-1} << k) | b_t) mod 2^L`` from
state 0, and reconstructs value t as ``c[s_t]``: the stored code is the k-bit inputs b_t.
"""
from __future__ import annotations

from functools import lru_cache
from statistics import NormalDist

import numpy as np

STATE_BITS = 8                      # L: 256 states
_BP_BYTES = 64 << 20                # back pointers kept per Viterbi batch


def viterbi(x: np.ndarray, table: np.ndarray, k: int, *, tagged: bool = False) -> np.ndarray:
    """The least squared error walk for each row of x (R, d) through the bit-shift trellis with codebook ``table``
    (2^L values) and k bits per step, from state 0: the states (R, d), int64.

    ``tagged``: the rule a vectorized native encoder keeps (tools/tcq_cost.py's AVX2 walk, step for step):
    the best cost into each group of predecessors carries that predecessor's index in its low k bits, so that one
    integer min over the float costs' bits (>= 0: they order as int32) picks cost and argmin at once; unreachable
    states start at 1e30 rather than infinity. Ties and near-ties (within 2^-20 relative) may then walk differently
    from the plain rule; the squared error is the same to float32 precision."""
    x = np.asarray(x, np.float32)
    n_states = len(table)
    L = n_states.bit_length() - 1
    if n_states != 1 << L or not 1 <= k < L:
        raise ValueError(f"a trellis of {n_states} states with {k} bits per step")
    K, H = 1 << k, n_states >> k
    R, d = x.shape
    t32 = np.asarray(table, np.float32)
    out = np.empty((R, d), np.int64)
    tops = np.arange(K, dtype=np.int32)[None, :, None]
    step = max(1, _BP_BYTES // max(1, d * H))
    for r0 in range(0, R, step):
        xr = x[r0:r0 + step]
        n = len(xr)
        if tagged:
            m = np.full((n, H), 1e30, np.float32)
            m[:, 0] = 0.0
        else:
            cost = np.full((n, n_states), np.inf, np.float32)
            cost[:, 0] = 0.0
        bp = np.zeros((d, n, H), np.uint8)
        for t in range(d):
            # predecessor p = top * H + low leads to s = low * K + b: the best top for each low, then every b
            if tagged:
                if t:
                    ci = (cost.reshape(n, K, H).view(np.int32) & np.int32(~(K - 1))) | tops
                    mi = np.min(ci, axis=1)
                    bp[t] = mi & (K - 1)
                    m = mi.view(np.float32)
            else:
                c3 = cost.reshape(n, K, H)
                bp[t] = np.argmin(c3, axis=1)
                m = np.min(c3, axis=1)
            err = xr[:, t, None] - t32[None, :]
            cost = (m[:, :, None] + (err * err).reshape(n, H, K)).reshape(n, n_states)
        s = np.argmin(cost, axis=1).astype(np.int64)
        rows = np.arange(n)
        for t in range(d - 1, -1, -1):
            out[r0 + rows, t] = s
            low = s >> k
            s = bp[t][rows, low].astype(np.int64) * H + low
    return out


def walk_inputs(states: np.ndarray, k: int) -> np.ndarray:
    """The k-bit inputs b_t of walks (the stored code): the low k bits of each state."""
    return np.asarray(states) & ((1 << k) - 1)


def states_from_inputs(bits: np.ndarray, k: int, state_bits: int) -> np.ndarray:
    """The walk from state 0 that inputs ``bits`` (R, d) make: what a decoder computes from the stored code."""
    bits = np.asarray(bits, np.int64)
    mask = (1 << state_bits) - 1
    s = np.zeros(bits.shape[0], np.int64)
    out = np.empty_like(bits)
    for t in range(bits.shape[1]):
        s = ((s << k) | bits[:, t]) & mask
        out[:, t] = s
    return out


@lru_cache(maxsize=None)
def codebook(k: int, state_bits: int = STATE_BITS) -> tuple[np.ndarray, float]:
    """(table, rho): the computed codebook for k bits per value and 2^L states, and the rms(x) / scale that suits it
    on N(0, 1) rows of 64."""
    n = 1 << state_bits
    rng = np.random.default_rng(0)
    inv = NormalDist().inv_cdf
    table = np.array([inv((i + 0.5) / n) for i in rng.permutation(n)], np.float32)
    x = rng.standard_normal((max(256, (1 << 20) // n), 64)).astype(np.float32)
    for _ in range(6):  # trellis Lloyd: each state's codeword becomes the mean of the values its walks gave it
        st = viterbi(x, table, k).ravel()
        cnt = np.bincount(st, minlength=n)
        tot = np.bincount(st, weights=x.ravel(), minlength=n)
        table = np.where(cnt > 0, tot / np.maximum(cnt, 1), table).astype(np.float32)
    best, rho = np.inf, 1.0
    probe = x[:512]
    for r in (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1):
        st = viterbi(probe * r, table, k)
        e = float(np.mean((table[st] / r - probe) ** 2))
        if e < best:
            best, rho = e, r
    return table, rho


