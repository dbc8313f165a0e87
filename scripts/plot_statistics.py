#!/usr/bin/env python
"""Render the batch-statistics figures of the paper from a run's recorded statistics.

Input: the ``statistics.csv`` written by mabn.stats.StatisticsRecorder (or a run directory that
holds one, or a TensorBoard event directory with ``statistics/<layer>/<stat>/<kind>`` scalars).

* Figure 2 (vanilla form): 4 panels mu_B, sigma^2_B, g_B, Psi_B; small against regular batch.
* Figure 3 (modified form): 2 panels chi^2_B, Psi_B; small against regular batch.
* Figure 4 (modified form with moving averages, e.g. MABN): chi^2, Psi; the statistic the layer
  used (SMA) against the regular batch.
* 2-used (vanilla form with moving averages in the backward pass, Table 2's row 5): g, Psi; the
  statistic the layer used against the regular batch.

    python scripts/plot_statistics.py outputs/run/statistics.csv --figure 2 --out results/figure2.png
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TITLES = {"mu": r"$\mu_B$", "sigma2": r"$\sigma^2_B$", "chi2": r"$\chi^2_B$", "g": r"$g_B$", "psi": r"$\Psi_B$"}
FIGURES = {
    "2": (("mu", "sigma2", "g", "psi"), ("small", "regular")),
    "3": (("chi2", "psi"), ("small", "regular")),
    "4": (("chi2", "psi"), ("used", "regular")),
    "2-used": (("g", "psi"), ("used", "regular")),
}
LABELS = {"small": "small batch (first group)", "regular": "regular batch (whole per-device batch)",
          "used": "moving average used by the layer"}


def load_csv(path):
    series = defaultdict(lambda: defaultdict(list))  # (layer, stat) -> kind -> [(it, value)]
    with open(path) as f:
        for row in csv.DictReader(f):
            for kind in ("small", "regular", "used"):
                value = float(row[kind])
                if not math.isnan(value):
                    series[(row["layer"], row["statistic"])][kind].append((int(row["iteration"]), value))
    return series


def load_events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    series = defaultdict(lambda: defaultdict(list))
    for tag in acc.Tags()["scalars"]:
        parts = tag.split("/")
        if parts[0] != "statistics" or len(parts) != 4:
            continue
        _, layer, stat, kind = parts
        series[(layer, stat)][kind] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return series


def load(path):
    if os.path.isdir(path):
        csv_path = os.path.join(path, "statistics.csv")
        if os.path.exists(csv_path):
            return load_csv(csv_path)
        return load_events(path)
    return load_csv(path)


def plot(series, layer, figure, out, title=None):
    stats, kinds = FIGURES[figure]
    missing = [s for s in stats if (layer, s) not in series]
    if missing:
        have = sorted({f"{l}:{s}" for l, s in series})
        raise SystemExit(f"figure {figure} needs statistics {missing} of layer {layer!r}; the input has {have}")
    fig, axes = plt.subplots(1, len(stats), figsize=(4.2 * len(stats), 3.4), squeeze=False)
    for ax, stat in zip(axes[0], stats):
        for kind, color in zip(kinds, ("tab:blue", "tab:orange")):
            pts = sorted(series[(layer, stat)].get(kind, []))
            if not pts:
                raise SystemExit(f"no {kind!r} values of {stat} for layer {layer!r}")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1, label=LABELS[kind])
        ax.set_title(TITLES[stat])
        ax.set_xlabel("iteration")
        ax.set_ylabel("l2 norm over channels")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or f"Figure {figure}: {layer}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def summary(series, layer, figure) -> str:
    """Mean relative deviation |other - regular| / regular over the recorded iterations, per panel."""
    stats, kinds = FIGURES[figure]
    parts = []
    for stat in stats:
        other = dict(series[(layer, stat)].get(kinds[0], []))
        regular = dict(series[(layer, stat)].get("regular", []))
        rel = [abs(other[i] - regular[i]) / regular[i] for i in other if i in regular and regular[i] > 0]
        if rel:
            parts.append(f"{stat}: {100 * sum(rel) / len(rel):.1f}%")
    return f"mean |{kinds[0]} - regular| / regular over {len(rel)} recorded iterations: " + ", ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="statistics.csv, a run directory, or a TensorBoard event directory")
    p.add_argument("--figure", choices=sorted(FIGURES), required=True)
    p.add_argument("--layer", default="layer1.0.bn1")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title")
    args = p.parse_args(argv)
    if not os.path.exists(args.input):
        raise SystemExit(f"input {args.input!r} does not exist")
    series = load(args.input)
    plot(series, args.layer, args.figure, args.out, args.title)
    print(summary(series, args.layer, args.figure))


if __name__ == "__main__":
    sys.exit(main())
