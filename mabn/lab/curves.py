"""Validation curves of a study's runs: a measure (e.g. box AP) against the iteration, one line per
row and schedule length (mean over its seeds, the band between the lowest and the highest seed:
a row run at two lengths, as in a convergence check, is two lines), as the paper's
training curves. Read from each run's ``val_log.jsonl`` (one line per validation), or, for runs
that predate it, from its TensorBoard events (``tb/``, the scalar ``val/<key>``)."""

from __future__ import annotations

import json
import os
import statistics

from .collect import find_runs

__all__ = ["run_curve", "study_curves", "plot_curves"]


def run_curve(run_dir: str, key: str) -> list[tuple[int, float]]:
    """[(iteration, value of ``key``)] of every validation of the run, in iteration order."""
    path = os.path.join(run_dir, "val_log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return sorted((int(r["iteration"]), float(r[key])) for r in rows if r.get(key) is not None)
    tb = os.path.join(run_dir, "tb")
    if not os.path.isdir(tb):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb, size_guidance={"scalars": 0})
    acc.Reload()
    tag = f"val/{key}"
    if tag not in acc.Tags().get("scalars", []):
        return []
    return sorted({e.step: e.value for e in acc.Scalars(tag)}.items())


def study_curves(roots: list[str], key: str, names: list[str]) -> dict[tuple[str, int], dict[int, list[float]]]:
    """{(row name, schedule iterations): {iteration: [value of each seed]}} of the finished runs
    under ``roots``, in the order of ``names``, then of the length."""
    found: dict[tuple[str, int], dict[int, list[float]]] = {}
    for root in roots:
        for run in find_runs(root):
            name = run["config"]["name"]
            if name in names and run["metrics"].get("status") == "finished":
                curve = found.setdefault((name, int(run["config"]["schedule"]["iterations"])), {})
                for it, value in run_curve(os.path.join(root, run["dir"]), key):
                    curve.setdefault(it, []).append(value)
    return {k: found[k] for k in sorted(found, key=lambda k: (names.index(k[0]), k[1]))}


def plot_curves(curves: dict[tuple[str, int], dict[int, list[float]]], labels: dict[str, str], ylabel: str,
                path: str) -> None:
    """One line per row and length (mean over seeds at each iteration; the band: lowest to highest
    seed); a row's label names its length where the row has several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = {}
    for name, iterations in curves:
        lengths.setdefault(name, []).append(iterations)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, ((name, iterations), points) in enumerate(curves.items()):
        if not points:
            continue
        its = sorted(points)
        label = labels.get(name, name) + (f", {iterations:,} iterations" if len(lengths[name]) > 1 else "")
        ax.plot(its, [statistics.mean(points[i_]) for i_ in its], marker="o", ms=3, color=f"C{i}",
                linestyle="-" if iterations == max(lengths[name]) else "--",
                label=f"{label} ({max(len(v) for v in points.values())} seeds)")
        ax.fill_between(its, [min(points[i_]) for i_ in its], [max(points[i_]) for i_ in its],
                        color=f"C{i}", alpha=0.2, linewidth=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
