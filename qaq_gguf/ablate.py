"""Ablation: does the error model rank layers right?

One layer's K (or V) is stored in a coarse type while every other layer keeps f16; the measured KL-divergence
against the all-f16 cache is set beside the score calibration predicted for that layer and type. The Spearman
rank correlation over all layers is the evidence that the solver spends bits where they matter.

    res = run(model, scores, text, type_name="q4_0")
    print(table(res))
"""
from __future__ import annotations

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
            f = profile.write_profile(profile.make_profile(ident, tk, tv, {"method": "ablation"}),
                                      work / f"ablate-{part}{il}.gguf")
            pred = float((scores.k if part == "k" else scores.v)[il, j])
            items.append({"layer": il, "part": part.upper(), "type": type_name, "predicted": pred,
                          "config": evaluate.CacheConfig(f"{part.upper()}{il}={type_name}", profile=str(f))})
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
    out = {"settings": settings, "calibration": scores.settings, "type": type_name, "rows": results,
           "spearman": {}}
    for part in {r["part"] for r in results} | {"all"}:
        rows = [r for r in results if part == "all" or r["part"] == part]
        if len(rows) >= 3:
            out["spearman"][part] = spearman([r["predicted"] for r in rows], [r["kld"] for r in rows])
    return out


def table(res: dict) -> str:
    lines = [f"one layer's K or V in {res['type']}, the rest f16: measured KLD vs predicted score "
             f"({res['settings']['n_chunks']}×{res['settings']['n_ctx']} tokens)",
             f"{'layer':>5} {'part':>4} {'predicted':>11} {'KLD':>10} {'ΔPPL %':>8}"]
    for r in sorted(res["rows"], key=lambda r: (r["part"], r["layer"])):
        lines.append(f"{r['layer']:>5} {r['part']:>4} {r['predicted']:>11.4g} {r['kld']:>10.5f} "
                     f"{r['dppl_pct']:>+8.3f}")
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
