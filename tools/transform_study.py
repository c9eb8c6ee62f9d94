#!/usr/bin/env python3
"""Each K/V transform's effect alone, on the real cache: uniform profiles with one transform on at a time.

    PYTHONPATH=. python3 tools/transform_study.py --calib-text ../shared/data/wikitext-2-valid.txt \\
        --text ../shared/data/wikitext-2-raw-test.txt --types q4_0,qaq3,qaq2 -o docs/results/transforms

For each type t: keys only (K t, V f16) plain / centred / centred + rebalanced / centred + exact first token /
all three; values only (K f16, V t) plain / centred / centred + exact first token; and both (K t, V t) plain /
all transforms / exact cells alone / all transforms with exact cells instead of the exact first token (the first N
cells kept in f16 whatever tokens they hold, N chosen from the attention the first positions draw during
calibration). Statistics come from calibration text (calibrate.calibrate with one candidate: the transforms'
statistics, not the solver's scores); every config is evaluated in one run against the f16 cache on the same
tokens, and with --chat also on the packaged evaluation chats (chat.py). Writes transforms.json and transforms.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qaq_gguf  # noqa: E402,F401
from qaq_gguf import calibrate, evaluate, models, profile  # noqa: E402


def variants(t: str) -> list[tuple[str, str, str, dict]]:
    """(label, type_k, type_v, transforms) rows for one type."""
    none = dict(k_mean=False, k_scale=False, first=False, v_mean=False, exact=False)
    rows = [(f"K {t}", t, "f16", none),
            (f"K {t} centred", t, "f16", {**none, "k_mean": True}),
            (f"K {t} centred+rebalanced", t, "f16", {**none, "k_mean": True, "k_scale": True}),
            (f"K {t} centred+exact first", t, "f16", {**none, "k_mean": True, "first": True}),
            (f"K {t} all", t, "f16", {**none, "k_mean": True, "k_scale": True, "first": True}),
            (f"V {t}", "f16", t, none),
            (f"V {t} centred", "f16", t, {**none, "v_mean": True}),
            (f"V {t} centred+exact first", "f16", t, {**none, "v_mean": True, "first": True}),
            (f"K,V {t}", t, t, none),
            (f"K,V {t} all", t, t, {**none, "k_mean": True, "k_scale": True, "first": True, "v_mean": True}),
            (f"K,V {t} exact cells", t, t, {**none, "exact": True}),
            (f"K,V {t} all, exact cells", t, t, {**none, "k_mean": True, "k_scale": True, "v_mean": True,
                                                 "exact": True})]
    return rows


def make_profile(stats: calibrate.Scores, tk: str, tv: str, on: dict, path: Path) -> str:
    s = calibrate.Scores(stats.ident, stats.candidates, stats.k, stats.v, {},
                         k_mean=stats.k_mean if on["k_mean"] else None,
                         k_scale=stats.k_scale if on["k_scale"] else None,
                         v_mean=stats.v_mean if on["v_mean"] else None,
                         k_first=stats.k_first if on["first"] else None,
                         v_first=stats.v_first if on["first"] else None,
                         exact_cells=stats.exact_cells if on["exact"] else 0)
    n = stats.ident.n_layer
    p = profile.make_profile(stats.ident, tk, tv, {"method": "transform-study"})
    p.k_mean, p.k_scale, p.v_mean = calibrate.centring_for(s, [tk] * n, [tv] * n)
    p.exact_cells = s.exact_cells
    if not on["v_mean"] and p.v_mean is not None and tv == "f16":
        p.v_mean = None  # an exact first token needs no value vector where V is not quantized
    if not on["k_mean"] and not on["first"]:
        p.k_mean = None
    return str(profile.write_profile(p, path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="a GGUF model or a bundled name (default: gemma3-270m)")
    ap.add_argument("--calib-text", required=True)
    ap.add_argument("--calib-chunks", type=int, default=8)
    ap.add_argument("--text", required=True)
    ap.add_argument("--types", default="q4_0,qaq3,qaq2")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--chat", action="store_true", help="also score every config on the evaluation chats")
    ap.add_argument("--only", help="only the rows whose label contains this (e.g. 'K,V' for the K and V rows)")
    ap.add_argument("--exact-cells", type=int, help="exact cells of the 'exact cells' rows (default: chosen from "
                    "the calibration's attention mass, at least 1)")
    ap.add_argument("-o", "--output-dir", default="transform-study")
    args = ap.parse_args()
    model = str(models.resolve(args.model)) if args.model else str(models.gemma3_270m())
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stats = calibrate.calibrate(model, Path(args.calib_text).read_text(), n_chunks=args.calib_chunks,
                                candidates=["f16", "q8_0"], n_threads=args.threads, exact_cells=None)
    stats.exact_cells = args.exact_cells or max(stats.exact_cells, 1)
    configs, rows = [], []
    for t in args.types.split(","):
        for label, tk, tv, on in variants(t):
            if args.only and args.only not in label:
                continue
            f = make_profile(stats, tk, tv, on, out / (label.replace(" ", "_").replace(",", "") + ".gguf"))
            configs.append(evaluate.CacheConfig(label, profile=f))
            rows.append({"label": label, "type": t, **on})
    res = evaluate.evaluate(model, evaluate.read_text_file(args.text), configs, n_ctx=args.ctx, n_chunks=args.chunks,
                            n_threads=args.threads, text_name=Path(args.text).name)
    for r, meta in zip(res["results"], rows):
        r.update(meta, exact_cells=stats.exact_cells if meta["exact"] else 0)
    if args.chat:
        chat = evaluate.evaluate_chat(model, configs, n_threads=args.threads)
        for r, c in zip(res["results"], chat["results"]):
            r["chat_kld"], r["chat_kld_err"], r["chat_top1"] = c["kld"], c["kld_err"], c["top1"]
    res["calibration"] = stats.settings
    res["seconds_total"] = round(time.time() - t0, 1)
    (out / "transforms.json").write_text(json.dumps(res, indent=1))
    s = res["settings"]
    md = [f"{s['text']}: {s['n_chunks']}x{s['n_ctx']} tokens ({s['n_tokens_scored']} scored), calibration "
          f"{stats.settings['n_chunks']}x{stats.settings['n_ctx']} tokens; {res['seconds_total']:.0f} s", "",
          f"exact cells: {stats.exact_cells} (attention mass of the first positions: "
          f"{', '.join(f'{x:.3f}' for x in stats.settings.get('sink_mass', [])[:8])}, ...)", "",
          "| config | KLD | ΔPPL % | top-1 % |" + (" chat KLD |" if args.chat else ""),
          "| --- | ---: | ---: | ---: |" + (" ---: |" if args.chat else "")]
    md += [f"| {r['label']} | {r['kld']:.4f} ± {r['kld_err']:.4f} | {r['dppl_pct']:+.2f} | {r['top1']:.2f} |" +
           (f" {r['chat_kld']:.4f} |" if args.chat else "") for r in res["results"]]
    (out / "transforms.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
