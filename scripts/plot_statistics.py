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
* deviation (several runs side by side): each run's training loss, and the relative error of the
  backward statistics the layer used, |used - regular| / regular of g and Psi (a running median
  over 11 recorded iterations); the inputs are run directories, each as LABEL=DIR or DIR.

    python scripts/plot_statistics.py outputs/run/statistics.csv --figure 2 --out results/figure2.png
    python scripts/plot_statistics.py --figure deviation "row 5=runs/a" "row 8=runs/b" --out dev.png
"""

from __future__ import annotations

import argparse
import csv
import json
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
    "deviation": (("g", "psi"), ("used", "regular")),  # several runs: plot_deviation
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


def save(fig, title, out):
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


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
    save(fig, title or f"Figure {figure}: {layer}", out)


def relative_deviation(series, layer, stat, kind="used") -> list[tuple[int, float]]:
    """|kind - regular| / regular at each iteration both were recorded (regular > 0)."""
    other = dict(series[(layer, stat)].get(kind, []))
    regular = dict(series[(layer, stat)].get("regular", []))
    return [(i, abs(other[i] - regular[i]) / regular[i]) for i in sorted(other) if regular.get(i, 0) > 0]


def running_median(points, width=11):
    """Each point's value replaced by the median of the ``width`` points centred on it (fewer at the ends)."""
    values, half, out = [v for _, v in points], width // 2, []
    for k, (it, _) in enumerate(points):
        window = sorted(values[max(0, k - half):k + half + 1])
        out.append((it, window[len(window) // 2]))
    return out


def training_loss(run_dir) -> list[tuple[int, float]]:
    path = os.path.join(run_dir, "train_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["iteration"], r["loss"]) for r in rows if "loss" in r]


def plot_deviation(runs, layer, out, title=None):
    """Figure "deviation": one line per run in each panel (loss; g's and Psi's relative error)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, run_dir in runs:
        series = load(run_dir)
        line = axes[0].plot(*zip(*training_loss(run_dir)), lw=1, label=label)[0] if training_loss(run_dir) else None
        for ax, stat in zip(axes[1:], ("g", "psi")):
            if (layer, stat) in series and series[(layer, stat)].get("used"):
                pts = running_median(relative_deviation(series, layer, stat))
                ax.plot(*zip(*[(i, 100 * v) for i, v in pts]), lw=1, label=label,
                        color=line.get_color() if line else None)
    axes[0].set_ylabel("training loss (50-iteration mean)")
    for ax, stat in zip(axes[1:], ("g", "psi")):
        ax.set_title(f"{TITLES[stat]}: moving average used vs regular batch")
        ax.set_ylabel("|used - regular| / regular (%)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, title or f"backward statistics' error, {layer}", out)


def deviation_summary(runs, layer) -> str:
    """Per run and statistic: the median relative error of the used statistic in each third of the run."""
    lines = []
    for label, run_dir in runs:
        series = load(run_dir)
        for stat in ("g", "psi"):
            pts = relative_deviation(series, layer, stat) if (layer, stat) in series else []
            if not pts:
                continue
            last = pts[-1][0]
            thirds = [[v for i, v in pts if k * last / 3 < i <= (k + 1) * last / 3] for k in range(3)]
            lines.append(f"{label}: {stat} " + " / ".join(f"{100 * sorted(t)[len(t) // 2]:.0f}%" for t in thirds if t)
                         + " (median |used - regular| / regular, thirds of the run)")
    return "\n".join(lines)


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
    p.add_argument("input", nargs="+", help="statistics.csv, a run directory, or a TensorBoard event directory "
                   "(figure deviation: run directories, each LABEL=DIR or DIR)")
    p.add_argument("--figure", choices=sorted(FIGURES), required=True)
    p.add_argument("--layer", default="layer1.0.bn1")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--title")
    args = p.parse_args(argv)
    runs = [tuple(x.split("=", 1)) if "=" in x else (os.path.basename(os.path.normpath(x)), x) for x in args.input]
    for _, path in runs:
        if not os.path.exists(path):
            raise SystemExit(f"input {path!r} does not exist")
    if args.figure == "deviation":
        plot_deviation(runs, args.layer, args.out, args.title)
        print(deviation_summary(runs, args.layer))
        return
    if len(runs) > 1:
        raise SystemExit(f"figure {args.figure} takes one input; got {len(runs)}")
    series = load(runs[0][1])
    plot(series, args.layer, args.figure, args.out, args.title)
    print(summary(series, args.layer, args.figure))


if __name__ == "__main__":
    sys.exit(main())
