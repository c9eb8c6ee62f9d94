"""Per-layer K/V cache type allocation as a multiple-choice knapsack.

Every layer ``l`` picks one K type and one V type out of the same candidate list.
Choosing candidate ``c`` for layer ``l``'s K costs ``costs_k[l][c]`` (predicted error,
e.g. from :mod:`scoring`) and takes ``weights_k[l] * bits[c]`` bits, ``weights_k[l]``
being the number of values that layer's K cache holds (sliding-window layers hold
fewer). The same goes for V. We minimise the total cost subject to

    sum_l weights_k[l] * bits[ck_l] + weights_v[l] * bits[cv_l] <= budget_bits.

K and V choices are independent groups of the knapsack, so ``2 * n_layer`` groups are
solved together. An infinite cost forbids a candidate for that layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Sequence

import numpy as np

# Largest DP table (groups x budget cells) solved exactly; beyond it, Lagrangian relaxation.
MAX_DP_CELLS = 20_000_000


@dataclass
class Allocation:
    """A solution: candidate indices per layer for K and V, and what they cost."""

    choice_k: list[int]
    choice_v: list[int]
    total_bits: float  # sum_l w_k[l] bits[ck_l] + w_v[l] bits[cv_l]
    avg_bits: float  # total_bits / sum of all weights
    cost: float  # predicted total error
    budget_bits: float
    exact: bool  # True: dynamic programme (optimal); False: Lagrangian heuristic


def budget_from_avg_bits(avg_bits: float, weights_k: Sequence[int], weights_v: Sequence[int]) -> float:
    """Total bit budget for an average of ``avg_bits`` bits per cached value."""
    return avg_bits * (sum(weights_k) + sum(weights_v))


def budget_from_bytes(n_bytes: int) -> float:
    """Total bit budget for a cache of ``n_bytes`` bytes."""
    return 8.0 * n_bytes


# ---------------------------------------------------------------------------
# Problem set-up


@dataclass
class _Problem:
    costs: np.ndarray  # (n_groups, n_cand), groups = K of every layer then V of every layer
    weights: np.ndarray  # (n_groups,) int
    bits: np.ndarray  # (n_cand,) float
    units: np.ndarray  # (n_groups, n_cand) int: weights * bits in DP units
    unit_bits: Fraction  # bits per DP unit


def _bit_denominator(bits: np.ndarray) -> int:
    """Smallest d <= 1024 with every bits value a multiple of 1/d (0.25 -> 4)."""
    for d in range(1, 1025):
        if np.all(np.abs(bits * d - np.round(bits * d)) < 1e-9):
            return d
    raise ValueError(f"bits per value {bits.tolist()} are not multiples of 1/1024")


def _problem(costs_k, costs_v, bits, weights_k, weights_v) -> _Problem:
    ck = np.asarray(costs_k, dtype=np.float64)
    cv = np.asarray(costs_v, dtype=np.float64)
    b = np.asarray(bits, dtype=np.float64)
    if ck.ndim != 2 or ck.shape != cv.shape or ck.shape[1] != b.shape[0]:
        raise ValueError(f"costs_k {ck.shape} and costs_v {cv.shape} must both be (n_layer, {b.shape[0]})")
    w = np.concatenate([np.asarray(weights_k), np.asarray(weights_v)])
    if w.shape != (2 * ck.shape[0],) or np.any(w != np.round(w)) or np.any(w < 0):
        raise ValueError("weights_k and weights_v need one non-negative integer per layer")
    if np.any(b <= 0):
        raise ValueError("bits per value must be positive")
    if np.any(np.isnan(ck)) or np.any(np.isnan(cv)):
        raise ValueError("costs contain NaN")
    w = w.astype(np.int64)
    costs = np.concatenate([ck, cv])
    d = _bit_denominator(b)
    g = reduce(math.gcd, w.tolist(), 0) or 1
    units = (w[:, None] // g) * np.round(b * d).astype(np.int64)[None, :]
    return _Problem(costs, w, b, units, Fraction(g, d))


def _allocation(p: _Problem, choice: np.ndarray, budget_bits: float, exact: bool) -> Allocation:
    n = len(choice) // 2
    idx = np.arange(len(choice))
    total = float(np.sum(p.weights * p.bits[choice]))
    return Allocation(
        choice_k=choice[:n].tolist(),
        choice_v=choice[n:].tolist(),
        total_bits=total,
        avg_bits=total / max(int(p.weights.sum()), 1),
        cost=float(np.sum(p.costs[idx, choice])),
        budget_bits=float(budget_bits),
        exact=exact,
    )


def _capacity(p: _Problem, budget_bits: float) -> int:
    """Budget in DP units, rounded down exactly (so a solution never exceeds it)."""
    if not math.isfinite(budget_bits):
        raise ValueError(f"budget must be finite, got {budget_bits}")
    cap = math.floor(Fraction(budget_bits) / p.unit_bits)
    smallest = _min_units(p)
    if cap < smallest:
        need = float(smallest * p.unit_bits)
        raise ValueError(
            f"budget of {budget_bits:g} bits is infeasible: the smallest allowed types already need "
            f"{need:g} bits ({need / max(int(p.weights.sum()), 1):g} bits per value)"
        )
    return cap


def _min_units(p: _Problem) -> int:
    allowed = np.isfinite(p.costs)
    if not np.all(allowed.any(axis=1)):
        raise ValueError("some layer has no allowed candidate (all costs infinite)")
    return int(np.where(allowed, p.units, np.iinfo(np.int64).max).min(axis=1).sum())


# ---------------------------------------------------------------------------
# Exact dynamic programme


def _dp_table(p: _Problem, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """best[b] = min cost within b units; choice[g, b] = pick of group g at that state."""
    n_groups, n_cand = p.costs.shape
    order = np.argsort(p.bits, kind="stable")  # ties go to the fewer-bits candidate
    best = np.zeros(cap + 1)
    choice = np.zeros((n_groups, cap + 1), dtype=np.int16)
    for gi in range(n_groups):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for c in order:
            cost, u = p.costs[gi, c], int(p.units[gi, c])
            if not np.isfinite(cost) or u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + cost
            better = cand < new
            new[better] = cand[better]
            pick[better] = c
        best, choice[gi] = new, pick
    return best, choice


def _backtrack(p: _Problem, choice: np.ndarray, b: int) -> np.ndarray:
    out = np.zeros(choice.shape[0], dtype=np.int64)
    for gi in range(choice.shape[0] - 1, -1, -1):
        c = int(choice[gi, b])
        out[gi] = c
        b -= int(p.units[gi, c])
    assert b >= 0
    return out


# ---------------------------------------------------------------------------
# Lagrangian relaxation + greedy repair (large tables only)


def _lagrangian(p: _Problem, cap: int) -> np.ndarray:
    """Price bits at lambda per unit, bisect the smallest lambda whose choice fits, then
    spend what is left greedily on the upgrades with the best cost reduction per unit.
    The result never exceeds ``cap``."""
    units = p.units.astype(np.float64)
    rows = np.arange(p.costs.shape[0])

    def pick(lam: float) -> np.ndarray:
        val = p.costs + lam * units
        low = val.min(axis=1, keepdims=True)
        tie = val <= low + 1e-12 * np.abs(low)
        return np.argmin(np.where(tie, units, np.inf), axis=1)  # ties: fewer units

    def used(c: np.ndarray) -> int:
        return int(p.units[rows, c].sum())

    choice = pick(0.0)
    if used(choice) > cap:
        lo, hi = 0.0, 1.0
        while used(pick(hi)) > cap and hi < 1e200:
            hi *= 2
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if used(pick(mid)) <= cap else (mid, hi)
        choice = pick(hi)
        if used(choice) > cap:  # smallest allowed type everywhere (fits: checked by _capacity)
            choice = np.argmin(np.where(np.isfinite(p.costs), units, np.inf), axis=1)

    left = cap - used(choice)
    while True:
        gain = p.costs[rows, choice][:, None] - p.costs
        extra = p.units - p.units[rows, choice][:, None]
        ok = (gain > 0) & (extra <= left)
        if not ok.any():
            break
        ratio = np.where(ok, gain / np.maximum(extra, 1), -np.inf)
        g, c = np.unravel_index(np.argmax(ratio), ratio.shape)
        left -= int(extra[g, c])
        choice[g] = c
    assert used(choice) <= cap
    return choice


# ---------------------------------------------------------------------------
# Public API


def solve(
    costs_k: Sequence[Sequence[float]],
    costs_v: Sequence[Sequence[float]],
    bits: Sequence[float],
    weights_k: Sequence[int],
    weights_v: Sequence[int],
    budget_bits: float,
    *,
    max_cells: int = MAX_DP_CELLS,
) -> Allocation:
    """Cheapest K/V candidate per layer whose total size fits ``budget_bits``.

    ``costs_k[l][c]`` / ``costs_v[l][c]``: predicted error of layer ``l``'s K / V in
    candidate ``c`` (``inf`` forbids it); ``bits[c]``: bits per value of candidate ``c``;
    ``weights_k[l]`` / ``weights_v[l]``: number of values in that layer's K / V cache;
    ``budget_bits``: total bits (see :func:`budget_from_avg_bits`, :func:`budget_from_bytes`).

    Exact: a dynamic programme over the budget in units of ``gcd(weights) / d`` bits,
    where ``1/d`` is the bits granularity (0.25 for ggml's cache types). If that table
    would exceed ``max_cells`` entries it falls back to Lagrangian relaxation with greedy
    repair (``Allocation.exact`` is False; usually optimal or close). Either way the
    result never exceeds the budget; ValueError if even the smallest types do not fit.
    """
    p = _problem(costs_k, costs_v, bits, weights_k, weights_v)
    cap = _capacity(p, budget_bits)
    cap = min(cap, int(p.units.max(axis=1).sum()))  # more budget than the largest types is useless
    if p.costs.shape[0] * (cap + 1) > max_cells:
        return _allocation(p, _lagrangian(p, cap), budget_bits, exact=False)
    best, choice = _dp_table(p, cap)
    return _allocation(p, _backtrack(p, choice, cap), budget_bits, exact=True)


def frontier(
    costs_k: Sequence[Sequence[float]],
    costs_v: Sequence[Sequence[float]],
    bits: Sequence[float],
    weights_k: Sequence[int],
    weights_v: Sequence[int],
    avg_bits: Sequence[float] | None = None,
    *,
    max_cells: int = MAX_DP_CELLS,
) -> list[Allocation]:
    """Solutions over a range of average-bits budgets, for quality-vs-size plots.

    ``avg_bits`` defaults to a 0.25-bit grid from the smallest feasible average up to the
    largest candidate. Infeasible budgets are skipped. One DP table serves all budgets.
    """
    p = _problem(costs_k, costs_v, bits, weights_k, weights_v)
    n_values = max(int(p.weights.sum()), 1)
    lo = float(_min_units(p) * p.unit_bits) / n_values
    if avg_bits is None:
        hi = float(np.max(p.bits))
        avg_bits = [lo + 0.25 * i for i in range(int((hi - lo) / 0.25 + 1e-9) + 1)]
    budgets = [budget_from_avg_bits(a, weights_k, weights_v) for a in avg_bits]
    feasible = [b for b in budgets if math.floor(Fraction(b) / p.unit_bits) >= _min_units(p)]
    if not feasible:
        return []
    top = min(_capacity(p, max(feasible)), int(p.units.max(axis=1).sum()))
    if p.costs.shape[0] * (top + 1) > max_cells:
        return [solve(costs_k, costs_v, bits, weights_k, weights_v, b, max_cells=max_cells) for b in feasible]
    _, choice = _dp_table(p, top)
    return [_allocation(p, _backtrack(p, choice, min(_capacity(p, b), top)), b, exact=True) for b in feasible]
