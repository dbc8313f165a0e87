"""Collect the runs of a study into a results table with the paper's numbers side by side.

Scans ``RUNS_DIR`` recursively for run directories (a ``metrics.json`` next to a ``config.yaml``),
groups them by configuration (experiment preset, and the normalization batch size for Figure 1(b)),
and writes ``results/<study>.md`` (or ``--out``): one row per configuration of the study with our
top-1 error (mean over seeds, with the spread), the paper's number, both gaps to the regular-batch
BN row, the seeds, and the runs' status. Diverged runs show "-" as in the paper; configurations
without any run are listed as missing, not dropped. For Figure 1(b) a PNG plot of error against
normalization batch size is written beside the table.

The command line is ``scripts/collect_results.py``, which calls :func:`main`. The output depends
only on the runs (no time stamps of its own), so re-running the collector on the same runs gives
the same file.

    python scripts/collect_results.py table2 runs/table2 --out results/table2_tiny.md \
        --title "Table 2, scaled down" --notes notes.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys

import yaml

from .studies import REFERENCE, STUDIES, Row


def find_runs(root: str) -> list[dict]:
    """Every run directory under ``root``: its config, metrics and provenance."""
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if "metrics.json" in filenames and "config.yaml" in filenames:
            with open(os.path.join(dirpath, "metrics.json")) as f:
                metrics = json.load(f)
            with open(os.path.join(dirpath, "config.yaml")) as f:
                config = yaml.safe_load(f)
            env = {}
            if os.path.exists(os.path.join(dirpath, "env.json")):
                with open(os.path.join(dirpath, "env.json")) as f:
                    env = json.load(f)
            runs.append({"dir": os.path.relpath(dirpath, root), "metrics": metrics, "config": config, "env": env})
    return runs


def run_key(run: dict, study: str):
    cfg = run["config"]
    if study == "figure1b":
        return cfg["name"], cfg["norm"]["norm_batch_size"]
    return cfg["name"], None


def fmt(x, digits=2, signed=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def summarize(rows: list[Row], runs: list[dict], study: str) -> list[dict]:
    by_key = {}
    for run in runs:
        by_key.setdefault(run_key(run, study), []).append(run)
    out = []
    for row in rows:
        rs = sorted(by_key.get((row.key, row.norm_batch_size), []), key=lambda r: r["config"]["seed"])
        finished = [r for r in rs if r["metrics"].get("status") == "finished"
                    and r["metrics"].get("val_top1_err") is not None]
        diverged = [r for r in rs if r["metrics"].get("status") == "diverged"]
        errs = [float(r["metrics"]["val_top1_err"]) for r in finished]
        out.append({
            "row": row, "runs": rs, "errs": errs, "diverged": diverged,
            "other": [r for r in rs if r not in finished and r not in diverged],
            "mean": statistics.mean(errs) if errs else None,
            "std": statistics.stdev(errs) if len(errs) > 1 else None,
        })
    return out


def render(study: str, summary: list[dict], runs_dir: str, title: str | None, notes: str | None,
           command: str) -> str:
    ref_key = REFERENCE[study]
    ref = next((s for s in summary if (s["row"].key, s["row"].norm_batch_size) == ref_key), None)
    ref_ours = ref["mean"] if ref else None
    ref_paper = ref["row"].paper_err if ref else None
    lines = [f"# {title or study}", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    lines += [f"Collected by `{command}` from the run directories under `{runs_dir}`.", ""]
    ref_label = ref["row"].label if ref else "?"
    lines += [
        f"Top-1 validation error (%), mean over seeds (± sample std when several seeds ran). "
        f"Gaps are to the regular-batch row ({ref_label}), ours against ours and paper against paper. "
        f"\"-\": the training diverged (a non-finite loss), as in the paper.",
        "",
        "| row | ours: top-1 err | ours: gap | paper: top-1 err | paper: gap | seeds | status |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    missing = []
    for s in summary:
        row = s["row"]
        seeds = ",".join(str(r["config"]["seed"]) for r in s["runs"]) or "none"
        if not s["runs"]:
            missing.append(row)
            ours, gap, status = "missing", "", "no run"
        else:
            if s["mean"] is not None:
                ours = fmt(s["mean"]) + (f" ± {s['std']:.2f}" if s["std"] is not None else "")
                gap = fmt(s["mean"] - ref_ours, signed=True) if ref_ours is not None else "-"
            else:
                ours, gap = "-", "-"
            parts = []
            if s["errs"]:
                parts.append(f"{len(s['errs'])} finished")
            if s["diverged"]:
                its = ",".join(str(r["metrics"].get("diverged_at", r["metrics"].get("iteration"))) for r in s["diverged"])
                parts.append(f"{len(s['diverged'])} diverged (iteration {its})")
            for r in s["other"]:
                parts.append(f"{r['metrics'].get('status', '?')} at iteration {r['metrics'].get('iteration')}")
            status = "; ".join(parts)
        paper = fmt(row.paper_err) if row.paper_err is not None else ("-" if study != "figure1b" else "n/a")
        if study == "figure1b" and row.paper_err is None:
            paper_gap = "n/a"
        else:
            paper_gap = fmt(row.paper_err - ref_paper, signed=True) if row.paper_err is not None and ref_paper is not None else "-"
        lines.append(f"| {row.label} | {ours} | {gap} | {paper} | {paper_gap} | {seeds} | {status} |")
    lines.append("")
    if missing:
        lines += ["Missing configurations (no run directory found): "
                  + ", ".join(f"`{m.key}`" + (f" (norm_batch_size={m.norm_batch_size})" if m.norm_batch_size else "") for m in missing) + ".", ""]
    # Provenance, from the runs themselves.
    all_runs = [r for s in summary for r in s["runs"]]
    if all_runs:
        hosts = sorted({r["env"].get("host", "?") for r in all_runs})
        commits = sorted({(r["env"].get("git_commit") or "?")[:10] + ("+dirty" if r["env"].get("git_dirty") else "") for r in all_runs})
        torch_v = sorted({(r["env"].get("packages") or {}).get("torch") or "?" for r in all_runs})
        starts = sorted(r["metrics"].get("started_at", "") for r in all_runs if r["metrics"].get("started_at"))
        ends = sorted(r["metrics"].get("ended_at", "") for r in all_runs if r["metrics"].get("ended_at"))
        wall = sum(float(r["metrics"].get("wall_time_s") or 0) for r in all_runs)
        cfg0 = all_runs[0]["config"]
        lines += [
            "Runs: " + f"{len(all_runs)} run directories; host(s) {', '.join(hosts)}; git {', '.join(commits)}; "
            f"torch {', '.join(torch_v)}; model {cfg0['model']['arch']} (small_input={cfg0['model']['small_input']}), "
            f"data {cfg0['data']['name']} {cfg0['data'].get('root') or ''} at {cfg0['data']['image_size']} px, "
            f"{cfg0['schedule']['iterations']} iterations of {cfg0['data']['batch_size']} images"
            + (f"; first start {starts[0]}, last end {ends[-1]}" if starts and ends else "")
            + (f"; summed wall time {wall / 60:.1f} min" if wall else "") + ".",
            "",
        ]
    return "\n".join(lines)


def plot_figure1b(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    methods = {}
    for s in summary:
        method = s["row"].label.split(",")[0]
        methods.setdefault(method, []).append(s)
    for method, ss in methods.items():
        pts = [(s["row"].norm_batch_size, s["mean"]) for s in ss if s["mean"] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} (ours)")
        paper = [(s["row"].norm_batch_size, s["row"].paper_err) for s in ss if s["row"].paper_err is not None]
        if paper:
            ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="x", s=40, label=f"{method} (paper)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
    ax.set_xlabel("normalization batch size |B| (gradient batch 32)")
    ax.set_ylabel("top-1 error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("runs_dir", help="folder holding the study's run directories (searched recursively)")
    p.add_argument("--out", help="markdown file (default results/<study>.md)")
    p.add_argument("--title")
    p.add_argument("--notes", help="markdown file whose text goes under the title (protocol, machine)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.runs_dir):
        print(f"runs_dir {args.runs_dir!r} is not a directory", file=sys.stderr)
        return 2
    out = args.out or os.path.join("results", f"{args.study}.md")
    notes = open(args.notes).read() if args.notes else None
    command = "python scripts/collect_results.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    summary = summarize(STUDIES[args.study], find_runs(args.runs_dir), args.study)
    text = render(args.study, summary, args.runs_dir, args.title, notes, command)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(text)
    if args.study == "figure1b":
        png = os.path.splitext(out)[0] + ".png"
        plot_figure1b(summary, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
