"""Profiles from a calibrated profile's scores and saved ablations (`qaq-gguf ablate ... -o DIR`: DIR/ablate.json;
one or several types), solved with their measured gains (qaq_gguf.ablate.with_gains) at each budget, the exact cells
counted inside the budget at --n-ctx as `qaq-gguf frontier` counts them (frontier.allocate_at). --shrink A weighs each layer's gain toward its part's
geometric mean (gain^A * mean^(1-A); A = 1: the gains as measured, 0: one weight per part, a measured KEY_WEIGHT;
default ablate.GAIN_SHRINK, what `qaq-gguf calibrate --gains` uses).

    python3 tools/solve_with_gains.py --scores cal40.gguf --ablation ablate.json --budgets 4.0,3.0,2.5 -o out/smollm2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qaq_gguf import ablate, calibrate, frontier, profile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", required=True, help="a calibrated profile (its stored scores)")
    ap.add_argument("--ablation", required=True, nargs="+", metavar="JSON",
                    help="ablate.json with its floor; several: the geometric mean of their gains")
    ap.add_argument("--budgets", default="4.0,3.0,2.5", help="bits per value, comma-separated")
    ap.add_argument("--shrink", type=float, default=ablate.GAIN_SHRINK, metavar="A",
                    help=f"gain^A * part mean^(1-A) (default {ablate.GAIN_SHRINK:g})")
    ap.add_argument("--n-ctx", type=int, default=1024, help="context the exact cells are counted at (default 1024)")
    ap.add_argument("-o", "--output", required=True, help="prefix: PREFIX-<bits>bits-gains<A>.gguf")
    args = ap.parse_args(argv)
    scores = calibrate.scores_from_profile(profile.read_profile(args.scores))
    results = [json.loads(Path(f).read_text()) for f in args.ablation]
    scores = ablate.with_gains(scores, results, shrink=args.shrink)
    for b in (float(x) for x in args.budgets.split(",")):
        p = frontier.allocate_at(scores, b, args.n_ctx)
        f = profile.write_profile(p, f"{args.output}-{b:.1f}bits-gains{args.shrink:g}.gguf")
        print(f"{f}  {profile.bits_at(p, args.n_ctx):.3f} bits at n_ctx={args.n_ctx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
