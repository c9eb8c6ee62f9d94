"""Ablation: does the error model rank layers right, and what does a unit of each layer's score cost end to end?

One layer's K (or V) is stored in a coarse type while every other layer keeps f16; the measured KL-divergence
against the all-f16 cache is set beside the score calibration predicted for that layer and type. The Spearman
rank correlation over all layers is the evidence that the solver spends bits where they matter.

Every ablation's KLD includes a floor that is no cache error: any change to one layer's attention output, however
small (the profile's transforms on an f16 cache move it by rounding alone), changes how the quantized weights'
matrix products round their activations downstream, and that alone measures ~0.003 (SmolLM2) to ~0.006 (Gemma 3)
against the f16 cache. A null config (every layer f16, with the transforms) measures it beside the ablations.

A layer's *gain* is its ablation's KLD above that floor per unit of its predicted score: what the score misses
downstream (later layers amplify or damp a layer's output error; a key error moves every later query's attention,
a value error does not). ``gains`` measures them on calibration text for the solver (calibrate._costs).

    res = run(model, scores, text, type_name="q4_0")
    print(table(res))
    scores = gains(model, scores, text)   # scores.gain_k, scores.gain_v
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from . import calibrate, evaluate, profile
from .progress import progress_bar


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            m = x == v
            r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / den) if den > 0 else 0.0


def run(model_path: str | Path, scores: calibrate.Scores, text: str, *, type_name: str = "q4_0",
        parts: Sequence[str] = ("k", "v"), layers: Sequence[int] | None = None, work_dir: str | Path = "qaq-ablate",
        n_ctx: int = 512, n_batch: int = 256, n_chunks: int | None = 4, n_threads: int | None = None,
        group: int = 6, progress: bool = True) -> dict:
    """Measure each (layer, part) ablation; ``group`` configs share one reference pass (memory: one model and
    context per config)."""
    if type_name not in scores.candidates:
        raise ValueError(f"{type_name} was not a calibration candidate ({', '.join(scores.candidates)})")
    ident = scores.ident
    j = scores.candidates.index(type_name)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    items = []
    for part in parts:
        for il in (layers if layers is not None else scores.layers()):
            tk, tv = ["f16"] * ident.n_layer, ["f16"] * ident.n_layer
            (tk if part == "k" else tv)[il] = type_name
            f = profile.write_profile(_ablation_profile(scores, tk, tv), work / f"ablate-{part}{il}.gguf")
            pred = float((scores.k if part == "k" else scores.v)[il, j])
            items.append({"layer": il, "part": part.upper(), "type": type_name, "predicted": pred,
                          "config": evaluate.CacheConfig(f"{part.upper()}{il}={type_name}", profile=str(f))})
    f16 = ["f16"] * ident.n_layer
    null = profile.write_profile(_ablation_profile(scores, f16, f16), work / "ablate-none.gguf")
    items.insert(0, {"layer": -1, "part": "none", "type": "f16", "predicted": 0.0,
                     "config": evaluate.CacheConfig("none (the floor)", profile=str(null))})
    results, settings = [], None
    bar = progress_bar(progress, len(items), "ablating", unit="layer")
    for g in range(0, len(items), group):
        chunk = items[g:g + group]
        res = evaluate.evaluate(model_path, text, [it["config"] for it in chunk], n_ctx=n_ctx, n_batch=n_batch,
                                n_chunks=n_chunks, n_threads=n_threads, progress=False)
        settings = res["settings"]
        for it, r in zip(chunk, res["results"]):
            results.append({k: v for k, v in it.items() if k != "config"} |
                           {"kld": r["kld"], "kld_err": r["kld_err"], "dppl_pct": r["dppl_pct"], "top1": r["top1"]})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    floor = results.pop(0)
    out = {"settings": settings, "calibration": scores.settings, "type": type_name, "rows": results,
           "floor": {"kld": floor["kld"], "kld_err": floor["kld_err"], "dppl_pct": floor["dppl_pct"]},
           "spearman": {}}
    for part in {r["part"] for r in results} | {"all"}:
        rows = [r for r in results if part == "all" or r["part"] == part]
        if len(rows) >= 3:
            out["spearman"][part] = spearman([r["predicted"] for r in rows], [r["kld"] for r in rows])
    return out


# a gain below this fraction of its part's median is taken as this (an ablation within the floor's noise)
GAIN_MIN_FRACTION = 0.1
# Each layer's gain is the geometric mean of its gains measured in two types (GAIN_TYPES: at 3.0 and 2.5 bits the
# profiles hold mostly these two), then taken halfway (geometrically) toward its part's mean:
# gain^GAIN_SHRINK * mean^(1-GAIN_SHRINK). One ablation of ~1,000 scored tokens carries the floor's noise: the same
# layers' gains in tcq3 and in tcq2 rank alike (Spearman K / V: SmolLM2 0.93 / 0.79, Gemma 3 0.71 / 0.59) but not
# equal. Measured against keys twice (docs/benchmarks.md, "Measured gains in the solver"): two types halfway is the one
# rule never worse by more than the error (worst 1.02x, Gemma 3 at 3.0 and 4.0 bits) and ahead on SmolLM2 (0.80-0.98x)
# and at 2.5 bits (0.95x); the gains as measured win more at 2.5 bits (0.84x, 0.91x) but lose on Gemma at 3.0 (1.04x).
GAIN_SHRINK = 0.5
GAIN_TYPES = ("tcq3", "tcq2")


def gains(model_path: str | Path, scores: calibrate.Scores, text: str, *, types: Sequence[str] = GAIN_TYPES,
          n_ctx: int = 512, n_chunks: int | None = 4, n_threads: int | None = None,
          progress: bool = True) -> calibrate.Scores:
    """The scores with every layer's measured gain (``gain_k``, ``gain_v``; see the module docstring): each layer's
    K and V ablated in each of ``types`` on ``text`` (calibration text, never the evaluation's), the floor taken off.
    2 x layers evaluations of ``n_chunks`` x ``n_ctx`` tokens per type."""
    results = []
    for t in types:
        with tempfile.TemporaryDirectory(prefix="qaq-gains-") as tmp:
            results.append(run(model_path, scores, text, type_name=t, work_dir=tmp, n_ctx=n_ctx, n_chunks=n_chunks,
                               n_threads=n_threads, progress=progress))
    return with_gains(scores, results)


def _measured_gains(scores: calibrate.Scores, res: dict, part: str) -> np.ndarray:
    """(KLD - floor) / predicted score per layer of one ablation, at least GAIN_MIN_FRACTION of the part's median."""
    floor, layers = res["floor"]["kld"], scores.layers()
    g = np.zeros(scores.ident.n_layer)
    rows = [r for r in res["rows"] if r["part"] == part]
    for r in rows:
        g[r["layer"]] = max(r["kld"] - floor, 0.0) / max(r["predicted"], 1e-30)
    have = sorted({r["layer"] for r in rows} & set(layers))
    if len(have) != len(layers):
        raise ValueError(f"the ablation measured {part} in {len(have)} of {len(layers)} layers")
    lo = GAIN_MIN_FRACTION * float(np.median(g[have]))
    if not lo > 0:
        raise ValueError(f"no {part} ablation in {res['type']} measured above the floor ({floor:.4g}): ablate with "
                         "a coarser type, or on more text")
    g[have] = np.maximum(g[have], lo)
    return g


def with_gains(scores: calibrate.Scores, results: dict | Sequence[dict],
               shrink: float = GAIN_SHRINK) -> calibrate.Scores:
    """The scores with the gains of one or more ablation results (``run``'s) set: each result's measured gains
    (_measured_gains), their geometric mean over the results, then ``shrink`` toward the part's geometric mean
    (1: as measured, 0: one gain per part)."""
    results = [results] if isinstance(results, dict) else list(results)
    layers = scores.layers()
    out = {}
    for part in ("K", "V"):
        g = np.zeros(scores.ident.n_layer)
        g[layers] = np.exp(np.mean([np.log(_measured_gains(scores, r, part)[layers]) for r in results], axis=0))
        mean = float(np.exp(np.mean(np.log(g[layers]))))
        g[layers] = g[layers] ** shrink * mean ** (1.0 - shrink)
        out[part] = g
    settings = dict(scores.settings, gain_type=",".join(r["type"] for r in results),
                    gain_floor=round(float(np.mean([r["floor"]["kld"] for r in results])), 6),
                    gain_tokens=int(results[0]["settings"]["n_chunks"]) * int(results[0]["settings"]["n_ctx"]),
                    gain_shrink=float(shrink))
    return dataclasses.replace(scores, gain_k=out["K"], gain_v=out["V"], settings=settings)


def _ablation_profile(scores: calibrate.Scores, tk: list[str], tv: list[str]) -> profile.Profile:
    """A profile of these types with the transforms and exact cells a calibrated profile of the scores stores, so
    that the ablated layer's error is the one its score predicts."""
    p = profile.make_profile(scores.ident, tk, tv, {"method": "ablation"})
    p.k_mean, p.k_scale, p.v_mean = calibrate.centring_for(scores, tk, tv)
    p.exact_cells = scores.exact_cells
    return p


def table(res: dict) -> str:
    lines = [f"one layer's K or V in {res['type']}, the rest f16: measured KLD vs predicted score "
             f"({res['settings']['n_chunks']}×{res['settings']['n_ctx']} tokens)",
             f"{'layer':>5} {'part':>4} {'predicted':>11} {'KLD':>10} {'ΔPPL %':>8}"]
    for r in sorted(res["rows"], key=lambda r: (r["part"], r["layer"])):
        lines.append(f"{r['layer']:>5} {r['part']:>4} {r['predicted']:>11.4g} {r['kld']:>10.5f} "
                     f"{r['dppl_pct']:>+8.3f}")
    if "floor" in res:
        lines.append(f"floor (every layer f16, the transforms kept): KLD {res['floor']['kld']:.5f}")
    lines.append("Spearman rank correlation (predicted vs measured): " +
                 ", ".join(f"{k} {v:+.3f}" for k, v in sorted(res["spearman"].items())))
    return "\n".join(lines)


def plot(res: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for part, color in (("K", "tab:blue"), ("V", "tab:orange")):
        rows = [r for r in res["rows"] if r["part"] == part]
        if rows:
            ax.scatter([r["predicted"] for r in rows], [max(r["kld"], 1e-7) for r in rows], color=color,
                       label=f"{part} (ρ={res['spearman'].get(part, float('nan')):+.2f})")
            for r in rows:
                ax.annotate(str(r["layer"]), (r["predicted"], max(r["kld"], 1e-7)), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"predicted score ({res['calibration'].get('method', '')})")
    ax.set_ylabel("measured KL-divergence vs f16")
    ax.set_title(f"one layer in {res['type']}, the rest f16")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
