"""Tests for qaq_gguf.solver (pure numpy)."""

import itertools
import math

import numpy as np
import pytest

from qaq_gguf import solver

BITS = [16.0, 8.5, 6.0, 5.5, 5.0, 4.5]  # f16 q8_0 q5_1 q5_0 q4_1 q4_0


def _brute_force(ck, cv, bits, wk, wv, budget):
    n, m = len(ck), len(bits)
    best = math.inf
    for combo in itertools.product(range(m), repeat=2 * n):
        k, v = combo[:n], combo[n:]
        size = sum(wk[l] * bits[k[l]] + wv[l] * bits[v[l]] for l in range(n))
        if size <= budget:
            best = min(best, sum(ck[l][k[l]] + cv[l][v[l]] for l in range(n)))
    return best


def _size(a, bits, wk, wv):
    return sum(wk[l] * bits[c] for l, c in enumerate(a.choice_k)) + sum(wv[l] * bits[c] for l, c in enumerate(a.choice_v))


def _random_case(rng, n_layer=3, n_cand=3):
    bits = sorted(rng.choice(BITS, size=n_cand, replace=False).tolist(), reverse=True)
    # coarser types cost more, with layer-dependent sensitivity
    base = np.sort(rng.uniform(0, 1, (n_layer, n_cand)), axis=1)
    ck = (base * rng.uniform(0.5, 5, (n_layer, 1))).tolist()
    cv = (np.sort(rng.uniform(0, 1, (n_layer, n_cand)), axis=1) * rng.uniform(0.1, 1, (n_layer, 1))).tolist()
    wk = rng.integers(1, 6, n_layer).tolist()
    wv = rng.integers(1, 6, n_layer).tolist()
    return ck, cv, bits, wk, wv


def test_dp_equals_brute_force_and_respects_budget():
    rng = np.random.default_rng(0)
    for _ in range(60):
        ck, cv, bits, wk, wv = _random_case(rng)
        lo = sum(wk) * min(bits) + sum(wv) * min(bits)
        hi = sum(wk) * max(bits) + sum(wv) * max(bits)
        budget = float(rng.uniform(lo, hi + 5))
        a = solver.solve(ck, cv, bits, wk, wv, budget)
        assert a.exact
        assert a.total_bits <= budget
        assert _size(a, bits, wk, wv) == pytest.approx(a.total_bits)
        assert a.cost == pytest.approx(_brute_force(ck, cv, bits, wk, wv, budget), abs=1e-12)
        assert a.avg_bits == pytest.approx(a.total_bits / (sum(wk) + sum(wv)))


def test_dp_exact_budget_boundary():
    """A budget hit exactly is feasible; a hair below it is not."""
    ck = [[0.0, 1.0], [0.0, 1.0]]
    cv = [[0.0, 1.0], [0.0, 1.0]]
    bits, w = [8.5, 4.5], [3, 3]
    exact = 3 * 8.5 + 3 * 4.5 * 3
    a = solver.solve(ck, cv, bits, w, w, exact)
    assert a.total_bits == exact and a.cost == 3.0
    b = solver.solve(ck, cv, bits, w, w, exact - 1e-9)
    assert b.total_bits <= exact - 1e-9 and b.cost == 4.0


def test_lagrangian_fallback_respects_budget():
    rng = np.random.default_rng(1)
    for _ in range(30):
        ck, cv, bits, wk, wv = _random_case(rng, n_layer=4, n_cand=4)
        lo = (sum(wk) + sum(wv)) * min(bits)
        budget = float(rng.uniform(lo, (sum(wk) + sum(wv)) * max(bits)))
        exact = solver.solve(ck, cv, bits, wk, wv, budget)
        approx = solver.solve(ck, cv, bits, wk, wv, budget, max_cells=1)
        assert not approx.exact
        assert approx.total_bits <= budget
        assert approx.cost >= exact.cost - 1e-12
        assert approx.cost <= 1.5 * exact.cost + 1e-9


def test_infeasible_budget_raises():
    ck = cv = [[0.0, 1.0]] * 2
    with pytest.raises(ValueError, match="infeasible"):
        solver.solve(ck, cv, [8.5, 4.5], [32, 32], [32, 32], 4.0 * 128)
    with pytest.raises(ValueError, match="infeasible"):
        solver.solve(ck, cv, [8.5, 4.5], [32, 32], [32, 32], 4.5 * 128 - 1, max_cells=1)
    a = solver.solve(ck, cv, [8.5, 4.5], [32, 32], [32, 32], 4.5 * 128)
    assert a.total_bits == 4.5 * 128


def test_avg_budget_of_4_5_gives_all_q4_0():
    names = ["f16", "q8_0", "q5_0", "q4_0"]
    bits = [16.0, 8.5, 5.5, 4.5]
    rng = np.random.default_rng(2)
    n = 6
    ck = np.sort(rng.uniform(0, 1, (n, 4)), axis=1).tolist()
    cv = np.sort(rng.uniform(0, 1, (n, 4)), axis=1).tolist()
    w = [1024 * 256] * n
    a = solver.solve(ck, cv, bits, w, w, solver.budget_from_avg_bits(4.5, w, w))
    assert [names[c] for c in a.choice_k + a.choice_v] == ["q4_0"] * (2 * n)
    assert a.avg_bits == 4.5


def test_generous_budget_gives_cheapest_and_ties_prefer_fewer_bits():
    bits = [16.0, 8.5, 4.5]
    ck = [[0.0, 0.0, 1.0], [0.0, 0.5, 2.0]]
    cv = [[0.0, 0.0, 0.0], [0.0, 0.1, 0.2]]
    w = [4, 4]
    a = solver.solve(ck, cv, bits, w, w, 1e6)
    assert a.cost == 0.0
    assert a.choice_k == [1, 0] and a.choice_v == [2, 0]


def test_sliding_window_layers_weigh_less():
    """Same sensitivity, but the small (SWA) layer is cheap to keep in high precision."""
    bits = [8.5, 4.5]
    ck = [[0.0, 1.0], [0.0, 1.0]]
    cv = [[0.0, 0.0], [0.0, 0.0]]
    wk, wv = [512, 8192], [512, 8192]
    budget = solver.budget_from_bytes(int((512 * 8.5 + 8192 * 4.5 + (512 + 8192) * 4.5) / 8))
    a = solver.solve(ck, cv, bits, wk, wv, budget)
    assert a.choice_k == [0, 1] and a.choice_v == [1, 1]
    assert a.total_bits <= budget


def test_infinite_cost_forbids_a_candidate():
    bits = [8.5, 4.5]
    ck = [[0.0, math.inf], [0.0, 1.0]]
    cv = [[0.0, 1.0], [0.0, 1.0]]
    a = solver.solve(ck, cv, bits, [1, 1], [1, 1], 8.5 + 3 * 4.5)
    assert a.choice_k[0] == 0 and a.total_bits <= 8.5 + 3 * 4.5
    with pytest.raises(ValueError):
        solver.solve(ck, cv, bits, [1, 1], [1, 1], 4 * 4.5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="costs"):
        solver.solve([[0, 1]], [[0, 1, 2]], [8.5, 4.5], [1], [1], 100)
    with pytest.raises(ValueError, match="weights"):
        solver.solve([[0, 1]], [[0, 1]], [8.5, 4.5], [1.5], [1], 100)


def test_frontier_is_monotone_and_within_budget():
    rng = np.random.default_rng(3)
    ck, cv, bits, wk, wv = _random_case(rng, n_layer=5, n_cand=4)
    sols = solver.frontier(ck, cv, bits, wk, wv)
    assert len(sols) >= 3
    costs = [s.cost for s in sols]
    assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:]))
    for s in sols:
        assert s.total_bits <= s.budget_bits
        ref = solver.solve(ck, cv, bits, wk, wv, s.budget_bits)
        assert s.cost == pytest.approx(ref.cost)
    assert solver.frontier(ck, cv, bits, wk, wv, avg_bits=[1.0]) == []
