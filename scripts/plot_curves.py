#!/usr/bin/env python
"""Plot a study's validation curves: a measure against the iteration, one line per row (mean
over seeds, band: lowest to highest seed), from the runs' val_log.jsonl (or TensorBoard events).

    python scripts/plot_curves.py det_table3 runs/det_table3/det_small_x2 --key bbox_AP --out results/table3_box_ap.png
"""

import argparse
import os
import sys

from mabn.lab.curves import plot_curves, study_curves
from mabn.lab.studies import STUDIES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("runs_dir", nargs="+", help="folder(s) holding the study's run directories")
    p.add_argument("--key", default="bbox_AP", help="the metrics key to plot (val_log.jsonl), e.g. segm_AP, top1_err")
    p.add_argument("--ylabel", help="the y axis label (default: the key)")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    missing = [d for d in args.runs_dir if not os.path.isdir(d)]
    if missing:
        print(f"error: runs_dir {missing[0]!r} is not a directory", file=sys.stderr)
        return 2
    rows = STUDIES[args.study]
    curves = study_curves(args.runs_dir, args.key, [r.key for r in rows])
    if not any(curves.values()):
        print(f"error: no finished run under {args.runs_dir} has a validation curve of {args.key!r}", file=sys.stderr)
        return 2
    plot_curves(curves, {r.key: r.label for r in rows}, args.ylabel or args.key, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
