"""Quality against size: uniform K/V type pairs next to calibrated profiles, evaluated side by side.

    res = run(model, scores, eval_text, budgets=[6.5, 5.5, 4.5])   # scores from calibrate.calibrate()
    plot(res, "frontier.png")

Every config is evaluated in the same run against the same f16 reference on the same tokens (evaluate.py), so
the comparison does not depend on the machine's noise. The x axis is the average bits per cached value over all
layers' K and V (equal weight per token, the budget ``qaq-gguf calibrate --budget`` solves for).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from . import cachetypes, calibrate, evaluate, profile

# the uniform pairs people run (-ctk/-ctv), finest first
UNIFORM_PAIRS: tuple[tuple[str, str], ...] = (
    ("q8_0", "q8_0"), ("q8_0", "q5_0"), ("q8_0", "q4_0"), ("q5_1", "q5_1"), ("q5_0", "q5_0"), ("q5_0", "q4_0"),
    ("q4_1", "q4_1"), ("q4_0", "q4_0"), ("iq4_nl", "iq4_nl"),
)
DEFAULT_BUDGETS: tuple[float, ...] = (8.5, 7.0, 6.5, 6.0, 5.5, 5.0, 4.5)


def uniform_bits(tk: str, tv: str, ident: profile.ModelIdentity) -> float:
    return profile.average_bits(profile.make_profile(ident, tk, tv))


def _bits(p: profile.Profile, n_ctx: int) -> float:
    """A profile's bits per value: its one figure (profile.average_bits), at n_ctx where exact cells add to it."""
    return profile.bits_at(p, n_ctx) if p.exact_cells else profile.average_bits(p)


def allocate_at(scores: calibrate.Scores, avg_bits: float, n_ctx: int) -> profile.Profile:
    """The calibrated profile whose bits at ``n_ctx``, everything counted, are ``avg_bits``: exact cells cost bits at
    that context, so the types get the budget less that."""
    return calibrate.allocate(scores, avg_bits=avg_bits - profile.exact_cells_bits(scores.ident, scores.exact_cells,
                                                                                    n_ctx))


def run(model_path: str | Path, scores: calibrate.Scores, text: str, *, budgets: Sequence[float] = DEFAULT_BUDGETS,
        pairs: Sequence[tuple[str, str]] = UNIFORM_PAIRS, work_dir: str | Path = "qaq-frontier", n_ctx: int = 1024,
        n_batch: int = 256, n_chunks: int | None = 8, n_threads: int | None = None, progress: bool = True,
        text_name: str | None = None, compare: Sequence[str | Path] = (), chat: bool = False) -> dict:
    """Evaluate ``pairs`` and one calibrated profile per budget (written to ``work_dir``) in one run; ``compare``:
    other profiles (an earlier calibration, say) evaluated in the same run as the series "compared". ``chat``: the
    same configs also scored on chats in the model's template (evaluate.evaluate_chat), as ``res["chat"]``."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    configs, meta = [], []
    for tk, tv in pairs:
        configs.append(evaluate.CacheConfig(f"{tk}/{tv}", type_k=tk, type_v=tv))
        meta.append({"series": "uniform", "bits": uniform_bits(tk, tv, scores.ident), "budget": None})
    for b in budgets:
        p = allocate_at(scores, b, n_ctx)
        f = profile.write_profile(p, work / f"qaq-{b:g}bits.gguf")
        configs.append(evaluate.CacheConfig(f"qaq@{b:g}", profile=str(f)))
        meta.append({"series": "calibrated", "bits": _bits(p, n_ctx), "budget": b,
                     "layer_type_k": p.type_k, "layer_type_v": p.type_v, "exact_cells": p.exact_cells})
    for f in compare:
        p = profile.read_profile(f)
        configs.append(evaluate.CacheConfig(f"compared:{Path(f).stem}", profile=str(f)))
        meta.append({"series": "compared", "bits": _bits(p, n_ctx), "exact_cells": p.exact_cells,
                     "budget": p.provenance.get(
            "budget_avg_bits"), "layer_type_k": p.type_k, "layer_type_v": p.type_v})
    res = evaluate.evaluate(model_path, text, configs, n_ctx=n_ctx, n_batch=n_batch, n_chunks=n_chunks,
                            n_threads=n_threads, progress=progress, text_name=text_name)
    for r, m in zip(res["results"], meta):
        r.update(m)
    res["calibration"] = scores.settings
    if chat:
        res["chat"] = evaluate.evaluate_chat(model_path, configs, n_batch=n_batch, n_threads=n_threads,
                                             progress=progress)
        for r, m in zip(res["chat"]["results"], meta):
            r.update(m)
    return res


def plot(res: dict, path: str | Path, *, title: str | None = None) -> Path:
    """PPL change and KLD against average bits: uniform pairs and the calibrated frontier as two series."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or qaq-gguf[demo])") from None
    panels = [(res, "dppl_pct", "PPL vs f16 cache (%)"), (res, "kld", "KL-divergence vs f16")]
    if "chat" in res:
        panels.append((res["chat"], "kld", "KL-divergence vs f16, chats"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8))
    for ax, (part, key, label) in zip(axes, panels):
        for series, style in (("uniform", dict(marker="o", ls="none", color="tab:gray")),
                              ("compared", dict(marker="^", ls="--", color="tab:blue")),
                              ("calibrated", dict(marker="s", ls="-", color="tab:red"))):
            rows = sorted((r for r in part["results"] if r.get("series") == series), key=lambda r: r["avg_bits"])
            if not rows:
                continue
            ax.plot([r["avg_bits"] for r in rows], [r[key] for r in rows], label=f"{series}", **style)
            if series == "uniform":
                for r in rows:
                    ax.annotate(r["label"], (r["avg_bits"], r[key]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xlabel("average bits per cached value at this n_ctx (K and V, scales included)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    s = res["settings"]
    fig.suptitle(title or f"{Path(s.get('model', 'model')).name}: {s['n_chunks']}×{s['n_ctx']} tokens, "
                 f"{s['n_tokens_scored']} scored")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summary(res: dict) -> str:
    """For each calibrated profile: the best uniform pair at no more bits, and whether the profile beats it; the
    same on chats when the run scored them."""
    out = _summary(res)
    if "chat" in res:
        out += "\n\non chats (" + res["chat"]["settings"]["text"] + "):\n" + _summary(res["chat"])
    return out


def _summary(res: dict) -> str:
    uni = [r for r in res["results"] if r.get("series") == "uniform"]
    lines = [f"{'profile':<10} {'bits':>6} {'ΔPPL %':>8} {'KLD':>9}   best uniform at ≤ bits"]
    width = max([10] + [len(r["label"]) for r in res["results"] if r.get("series") in ("calibrated", "compared")])
    lines[0] = f"{'profile':<{width}}" + lines[0][10:]
    for r in (r for r in res["results"] if r.get("series") in ("calibrated", "compared")):
        # bits: the one figure of a profile (profile.average_bits), the same in the table and in "bits"
        ok = [u for u in uni if u["avg_bits"] <= r["avg_bits"] + 1e-9]
        best = min(ok, key=lambda u: u["kld"]) if ok else None
        cmp = (f"{best['label']:<14} {best['avg_bits']:>5.2f} {best['dppl_pct']:+8.3f} {best['kld']:9.5f}  "
               f"{'beats it' if r['kld'] < best['kld'] else 'does NOT beat it'} (KLD)") if best else "none"
        lines.append(f"{r['label']:<{width}} {r['avg_bits']:>6.3f} {r['dppl_pct']:+8.3f} {r['kld']:9.5f}   {cmp}")
    return "\n".join(lines)


def save(res: dict, path: str | Path) -> Path:
    out = Path(path)
    out.write_text(json.dumps(res, indent=1))
    return out


def pairs_from_arg(s: str) -> list[tuple[str, str]]:
    """'q8_0/q4_0,q4_0/q4_0' -> [("q8_0", "q4_0"), ("q4_0", "q4_0")]."""
    out = []
    for item in s.split(","):
        tk, _, tv = item.strip().partition("/")
        for t in (tk, tv or tk):
            cachetypes.get(t)
        out.append((tk, tv or tk))
    return out
