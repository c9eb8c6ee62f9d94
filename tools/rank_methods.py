"""Rank correlation of each calibration error model against a measured ablation.

The ablation's measured KL-divergences do not depend on the error model, so one ablation run
(`qaq-gguf ablate ... -o DIR`) serves every method: this script calibrates with each method and
reports Spearman's rho of predicted score vs measured KLD for K, V and both together.

    PYTHONPATH=. python3 tools/rank_methods.py --ablation docs/results/ablate/ablate.json \
        --calib-text ../shared/data/wikitext-2-valid.txt
"""
from __future__ import annotations

import argparse
import json

import qaq_gguf  # noqa: F401  (binds llama-cpp-python first)
from qaq_gguf import ablate, calibrate, models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ablation", required=True, help="ablate.json written by `qaq-gguf ablate`")
    ap.add_argument("--calib-text", required=True, help="calibration text (never the evaluation text)")
    ap.add_argument("--model", help="GGUF model (default: the bundled Gemma 3 270M)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="write the correlations as JSON")
    args = ap.parse_args()
    ab = json.load(open(args.ablation))
    model = args.model or str(models.gemma3_270m())
    text = open(args.calib_text).read()
    res = {}
    for method in ("measured", "qaq"):
        sc = calibrate.calibrate(model, text, n_chunks=args.chunks, method=method, n_threads=args.threads)
        j = sc.candidates.index(ab["type"])

        def pred(r):
            return (sc.k if r["part"] == "K" else sc.v)[r["layer"], j]

        res[method] = {part: ablate.spearman([pred(r) for r in rows], [r["kld"] for r in rows])
                       for part, rows in (("K", [r for r in ab["rows"] if r["part"] == "K"]),
                                          ("V", [r for r in ab["rows"] if r["part"] == "V"]),
                                          ("all", ab["rows"]))}
        print(f"{method:>9}: " + ", ".join(f"{k} {v:+.3f}" for k, v in res[method].items()))
    if args.out:
        json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
