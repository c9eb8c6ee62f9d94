"""Calibration: from a model and text to per-layer K/V sensitivity scores, and from scores to a profile.

    scores = calibrate(model, text)                       # runs the model (collect.py), scores (scoring.py)
    prof = allocate(scores, avg_bits=5.5)                 # multiple-choice knapsack (solver.py)
    write_profile(prof, "qaq.gguf")

``calibrate`` streams: each chunk's activations are scored under every candidate type and dropped, so memory
stays at one chunk whatever the text length. The score of layer ``l``'s K in type ``t`` is the relative
attention-output error QAQ's model predicts (``scoring.py``), averaged over chunks; the solver minimises the sum
of the chosen scores under the size budget.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _native, cachetypes, collect, profile, scoring, solver


@dataclass
class Scores:
    """Per-layer scores of one model: ``k[l, c]`` / ``v[l, c]`` for candidate ``candidates[c]``."""

    ident: profile.ModelIdentity
    candidates: list[str]
    k: np.ndarray
    v: np.ndarray
    settings: dict = field(default_factory=dict)
    # per-layer mean keys (flat, n_head_kv * head_dim_k per layer) when the cache stores keys centred
    k_mean: np.ndarray | None = None

    def layers(self) -> list[int]:
        return [il for il in range(self.ident.n_layer) if self.ident.has_kv(il)]


# cache types without a CUDA flash-attention kernel (ggml-cuda fattn: f16, q4_0, q4_1, q5_0, q5_1, q8_0, bf16,
# and qaq-gguf's qaq3/qaq2)
NO_CUDA_FA = ("iq4_nl",)


def default_candidates() -> list[str]:
    """The cache types calibration chooses from: f16 and every quantized type this build's cache accepts; with a
    CUDA backend, only those its flash attention has kernels for (a profile using another is refused there)."""
    cands = list(cachetypes.DEFAULT_CANDIDATES)
    if "CUDA" in _native.backend_names():
        cands = [c for c in cands if c not in NO_CUDA_FA]
    return cands


def calibrate(model_path: str | Path, text: str, *, n_ctx: int = 512, n_chunks: int | None = 8,
              candidates: Sequence[str] | None = None, method: str = "measured", max_queries: int | None = 128,
              window: int = 5, n_threads: int | None = None, progress: bool = True, seed: int = 0,
              center_keys: bool = True) -> Scores:
    """Score every layer's K and V under every candidate type on ``text`` (see the module docstring).

    ``method``: ``"measured"`` pushes the real quantization error of each type through the layer's real
    attention (first order in the key error); ``"qaq"`` uses QAQ's closed-form bounds (query-norm percentile for
    keys, attention with the persistence window for values). ``max_queries`` samples query rows per chunk.

    ``center_keys``: the profile stores each layer's mean key and the cache keeps keys centred (``k - mean``,
    exact for attention, llama_model_set_kv_layer_k_mean). The mean is the running mean of the chunks seen so far
    (the first chunk's own mean for chunk 0), so every chunk is scored with a mean it did not fully determine;
    the final mean over all chunks is what the profile stores."""
    cands = list(candidates) if candidates else default_candidates()
    for c in cands:
        cachetypes.get(c)  # unknown names fail here, before the model runs
    if center_keys and (why := profile.centring_blocked(model_path)):
        print(f"qaq-gguf: keys stored as they are: {why}", file=sys.stderr)
        center_keys = False
    ident = profile.model_identity(model_path)
    layers = [il for il in range(ident.n_layer) if ident.has_kv(il)]
    sk = np.zeros((ident.n_layer, len(cands)))
    sv = np.zeros((ident.n_layer, len(cands)))
    k_sum: dict[int, np.ndarray] = {}
    n_tok = 0
    n_done = 0
    bar = progress_bar(progress, n_chunks, "calibrating")
    try:
        for c, chunk in enumerate(collect.iter_chunks(model_path, text, n_ctx=n_ctx, n_chunks=n_chunks,
                                                      layers=layers, n_threads=n_threads)):
            for il, act in chunk.items():
                k_sum[il] = k_sum.get(il, 0.0) + act.k.astype(np.float64).sum(axis=0)
                mean = (k_sum[il] / (n_tok + act.k.shape[0])).astype(np.float32) if center_keys else None
                res = scoring.score_layer(act.q, act.k, act.v, act.attn, cands, method=method,
                                          kq_scale=collect.estimate_kq_scale(act),
                                          window=window, max_queries=max_queries, seed=seed + c, k_mean=mean)
                for j, name in enumerate(cands):
                    sk[il, j] += res[name][0]
                    sv[il, j] += res[name][1]
            n_tok += next(iter(chunk.values())).k.shape[0] if chunk else 0
            n_done += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    sk /= n_done  # layers without a cache were never scored: they stay 0, no choice to make
    sv /= n_done
    settings = {"text_sha256": hashlib.sha256(text.encode()).hexdigest(), "n_ctx": n_ctx, "n_chunks": n_done,
                "n_tokens": n_done * n_ctx, "method": method, "max_queries": max_queries or 0,
                "window": window, "candidates": cands, "center_keys": center_keys}
    k_mean = None
    if center_keys and n_tok:
        k_mean = np.concatenate([(k_sum[il] / n_tok).astype(np.float32).ravel() if il in k_sum
                                 else np.zeros(ident.n_embd_k(il), np.float32)
                                 for il in range(ident.n_layer)])
    return Scores(ident, cands, sk, sv, settings, k_mean)


def progress_bar(progress: bool, total: int | None, desc: str, unit: str = "chunk"):
    """A tqdm bar, or None when progress is off."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def _weights(ident: profile.ModelIdentity, n_ctx: int | None) -> tuple[list[int], list[int]]:
    wk, wv = [], []
    for il in range(ident.n_layer):
        if n_ctx is None:
            nk = ident.n_head_kv[il] * ident.head_dim_k[il] if ident.has_kv(il) else 0
            nv = ident.n_head_kv[il] * ident.head_dim_v[il] if ident.has_kv(il) else 0
        else:
            nk, nv = profile.layer_values(ident, il, n_ctx)
        wk.append(nk)
        wv.append(nv)
    return wk, wv


def _costs(scores: Scores, cands: list[str]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Cost matrices for the solver; a candidate whose blocks do not divide a layer's head size is forbidden."""
    idx = [scores.candidates.index(c) for c in cands]
    ck = scores.k[:, idx].copy()
    cv = scores.v[:, idx].copy()
    for il in range(scores.ident.n_layer):
        if not scores.ident.has_kv(il):
            continue
        for j, c in enumerate(cands):
            bs = cachetypes.get(c).block_size
            if scores.ident.head_dim_k[il] % bs:
                ck[il, j] = np.inf
            if scores.ident.head_dim_v[il] % bs:
                cv[il, j] = np.inf
    return ck, cv, [cachetypes.bits(c) for c in cands]


def allocate(scores: Scores, *, avg_bits: float | None = None, max_kv_bytes: int | None = None,
             n_ctx: int | None = None, candidates: Sequence[str] | None = None,
             provenance: dict | None = None) -> profile.Profile:
    """The profile with the least predicted error whose size fits the budget.

    ``avg_bits``: average bits per cached value over every layer's K and V, block scales included (4.5 = the size
    of a uniform q4_0 cache). ``max_kv_bytes`` with ``n_ctx``: the whole cache at that context length fits in that
    many bytes, sliding-window layers counted with the cells they really hold. Exactly one of the two."""
    if (avg_bits is None) == (max_kv_bytes is None):
        raise ValueError("give one budget: avg_bits, or max_kv_bytes with n_ctx")
    if max_kv_bytes is not None and not n_ctx:
        raise ValueError("max_kv_bytes needs n_ctx (the context length the cache must hold)")
    cands = list(candidates) if candidates else list(scores.candidates)
    ck, cv, bits = _costs(scores, cands)
    wk, wv = _weights(scores.ident, n_ctx if max_kv_bytes is not None else None)
    if avg_bits is not None:
        budget = solver.budget_from_avg_bits(avg_bits, wk, wv)
    else:
        budget = solver.budget_from_bytes(max_kv_bytes)
    try:
        sol = solver.solve(ck, cv, bits, wk, wv, budget)
    except ValueError:
        smallest = cands[int(np.argmin(bits))]
        need = (f"{cachetypes.bits(smallest):g} bits per value" if avg_bits is not None else
                f"{profile.kv_bytes(profile.make_profile(scores.ident, smallest, smallest), n_ctx)} bytes at "
                f"n_ctx={n_ctx}")
        raise ValueError(f"the budget is below the smallest cache these candidates can make ({need})") from None
    return _profile_from(scores, cands, sol, avg_bits=avg_bits, max_kv_bytes=max_kv_bytes, n_ctx=n_ctx,
                         provenance=provenance)


def _profile_from(scores: Scores, cands: list[str], sol: solver.Allocation, *, avg_bits=None, max_kv_bytes=None,
                  n_ctx=None, provenance=None) -> profile.Profile:
    tk = [cands[j] for j in sol.choice_k]
    tv = [cands[j] for j in sol.choice_v]
    prov = {"method": f"qaq-{scores.settings.get('method', 'measured')}",
            "predicted_error": float(sol.cost)}
    prov.update({f"calib_{k}": v for k, v in scores.settings.items()})
    if avg_bits is not None:
        prov["budget_avg_bits"] = float(avg_bits)
    if max_kv_bytes is not None:
        prov["budget_kv_bytes"] = int(max_kv_bytes)
        prov["budget_n_ctx"] = int(n_ctx)
    prov.update(provenance or {})
    p = profile.make_profile(scores.ident, tk, tv, prov)
    p.candidates = list(scores.candidates)
    p.score_k = scores.k
    p.score_v = scores.v
    p.k_mean = scores.k_mean
    return p


def frontier(scores: Scores, avg_bits: Sequence[float] | None = None, *, candidates: Sequence[str] | None = None,
             provenance: dict | None = None) -> list[profile.Profile]:
    """Profiles along the predicted quality/size frontier (default: a 0.25-bit grid over the feasible range),
    one per distinct allocation."""
    cands = list(candidates) if candidates else list(scores.candidates)
    ck, cv, bits = _costs(scores, cands)
    wk, wv = _weights(scores.ident, None)
    total = max(sum(wk) + sum(wv), 1)
    out, seen = [], set()
    for sol in solver.frontier(ck, cv, bits, wk, wv, avg_bits):
        key = (tuple(sol.choice_k), tuple(sol.choice_v))
        if key not in seen:
            seen.add(key)
            out.append(_profile_from(scores, cands, sol, avg_bits=sol.budget_bits / total, provenance=provenance))
    return out


def scores_from_profile(p: profile.Profile) -> Scores:
    """The calibration scores stored in a profile (so a new budget needs no new calibration run)."""
    if not p.candidates or p.score_k is None:
        raise profile.ProfileError("this profile carries no calibration scores (it was not made by calibrate)")
    n, c = p.model.n_layer, len(p.candidates)
    settings = {k[len("calib_"):]: v for k, v in p.provenance.items() if k.startswith("calib_")}
    return Scores(p.model, list(p.candidates), np.asarray(p.score_k, float).reshape(n, c),
                  np.asarray(p.score_v, float).reshape(n, c), settings, p.k_mean)
