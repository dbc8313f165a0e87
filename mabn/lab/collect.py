"""Collect the runs of a study into a results table with the paper's numbers side by side.

Scans ``RUNS_DIR`` recursively for run directories (a ``metrics.json`` next to a ``config.yaml``),
groups them by configuration (experiment preset, and the value of the setting the study sweeps
besides it, ``studies.SWEPT_KEY``: the normalization batch size for Figure 1(b), the schedule
length for the convergence check) and writes ``results/<study>.md`` (or ``--out``):

- table2 / table4: one line per row of the paper's table, the row number first, then our mean
  top-1 error over seeds, its sample std, the paired gap to the regular-batch row (the mean over
  shared seeds of the per-seed difference, with its std), the paper's error and gap, the seeds and
  the runs' status. Diverged runs show "-" as in the paper; rows without any run are "missing".
- figure1b: one line per method (BN, BRN, MABN) with the mean error at b = 2, 4, 8, 16, 32, the
  paper's known points, and a PNG (error against b, one line per method with its seed spread).
- table2 / table4 / figure1b also get a table of the paper's claims (``studies.CLAIMS``): for each,
  our paired gap with its 95% confidence interval (Student's t over the shared seeds) and whether
  our runs agree, disagree, or cannot tell (the interval straddles zero).
- convergence: each row's error at each schedule length and the change when it is doubled,
  with the verdict (converged when every change is below 1.5 points).

The command line is ``scripts/collect_results.py``, which calls :func:`main`. The output depends
only on the runs (no time stamps of its own), so re-running the collector on the same runs gives
the same file.

    python scripts/collect_results.py table2 runs/table2 --out results/table2.md \
        --title "Table 2" --notes results/table2.notes.md
    python scripts/collect_results.py table4 runs/table4 runs/table2 --seeds 0,1   # shared rows

Several folders may be given: a row without runs of its own takes the runs of the configuration
that ``mabn.lab.studies.SAME_AS`` names as the same (Table 4's rows 1, 4, 5, 9 are Table 2's
rows 8, 7, 6, 3; Figure 1(b)'s points at b = 2 are Table 2's runs, BN at b = 32 is its row 1), and
says so in the status column. ``--seeds`` keeps only the runs of those seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys

import yaml

from mabn.engine import files

from .studies import (CLAIMS, CONVERGENCE_TOLERANCE, FIGURE1B_METHODS, FIGURE1B_SIZES, REFERENCE, SAME_AS,
                      STUDIES, SWEPT_KEY, Row)


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


def run_key(run: dict, study: str) -> tuple[str, int | None]:
    """The configuration a run belongs to: its preset and the value of the study's swept setting
    (``studies.SWEPT_KEY``: Figure 1(b)'s normalization batch size, the convergence check's
    schedule length; None for a study that sweeps only presets)."""
    cfg = run["config"]
    if study not in SWEPT_KEY:
        return cfg["name"], None
    section, field = SWEPT_KEY[study].split(".")
    return cfg["name"], cfg[section][field]


def swept_name(study: str) -> str:
    """The swept setting's field name as the tables print it (``norm_batch_size``)."""
    return SWEPT_KEY[study].rsplit(".", 1)[-1]


def row_key(row: Row) -> tuple[str, int | None]:
    """A row's configuration, keyed like :func:`run_key`."""
    return row.key, row.swept_value


def fmt(x, digits=2, signed=False):
    """``x`` with ``digits`` decimals (a sign with ``signed``); "-" for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _summary(row: Row, rs: list[dict], same_as: str | None = None) -> dict:
    rs = sorted(rs, key=lambda r: r["config"]["seed"])
    finished = [r for r in rs if r["metrics"].get("status") == "finished"
                and r["metrics"].get("val_top1_err") is not None]
    diverged = [r for r in rs if r["metrics"].get("status") == "diverged"]
    errs = [float(r["metrics"]["val_top1_err"]) for r in finished]
    return {
        "row": row, "runs": rs, "errs": errs, "diverged": diverged,
        "by_seed": {r["config"]["seed"]: float(r["metrics"]["val_top1_err"]) for r in finished},
        "other": [r for r in rs if r not in finished and r not in diverged],
        "mean": statistics.mean(errs) if errs else None,
        "std": statistics.stdev(errs) if len(errs) > 1 else None,
        "same_as": same_as,  # the preset whose runs these are (studies.SAME_AS), or None
    }


def summarize(rows: list[Row], runs: list[dict], study: str) -> list[dict]:
    """One summary per row of the study (per row and schedule length for the convergence check)."""
    by_key = {}
    for run in runs:
        by_key.setdefault(run_key(run, study), []).append(run)
    if study == "convergence":
        return [_summary(dataclasses.replace(row, swept_value=iters), by_key[(row.key, iters)])
                for row in rows for iters in sorted(k[1] for k in by_key if k[0] == row.key)]
    out = []
    for row in rows:
        key = row_key(row)
        alias = SAME_AS.get(key)
        if not by_key.get(key) and alias and by_key.get(alias):
            out.append(_summary(row, by_key[alias], same_as=alias[0]))
        else:
            out.append(_summary(row, by_key.get(key, [])))
    return out


def paired_diffs(s: dict | None, ref: dict | None) -> list[float]:
    """err(row, seed) - err(reference, seed) for each seed both finished, in seed order."""
    if s is None or ref is None:
        return []
    return [s["by_seed"][k] - ref["by_seed"][k] for k in sorted(s["by_seed"]) if k in ref["by_seed"]]


def paired_gap(s: dict, ref: dict | None) -> tuple[float | None, float | None, int]:
    """Mean and sample std of err(row, seed) - err(reference, seed) over the seeds both finished."""
    if ref is None:
        return None, None, 0
    diffs = paired_diffs(s, ref)
    return (statistics.mean(diffs) if diffs else None,
            statistics.stdev(diffs) if len(diffs) > 1 else None, len(diffs))


def status_text(s: dict) -> str:
    """A summary's status column: how many runs finished, diverged (and where) or stopped, and
    whose runs they are when another configuration's were used."""
    parts = []
    if s["errs"]:
        parts.append(f"{len(s['errs'])} finished")
    if s["diverged"]:
        its = ",".join(str(r["metrics"].get("diverged_at", r["metrics"].get("iteration"))) for r in s["diverged"])
        parts.append(f"{len(s['diverged'])} diverged (iteration {its})")
    for r in s["other"]:
        parts.append(f"{r['metrics'].get('status', '?')} at iteration {r['metrics'].get('iteration')}")
    if s.get("same_as") and parts:
        parts.append(f"the runs of `{s['same_as']}` (the same configuration)")
    return "; ".join(parts) or "no run"


def _seeds(s: dict) -> str:
    """The seeds of a summary's runs, comma-separated ("none" without runs)."""
    return ",".join(str(r["config"]["seed"]) for r in s["runs"]) or "none"


def _table_lines(study: str, summary: list[dict]) -> tuple[list[str], list[Row]]:
    """Table 2 / Table 4: row, our mean, std, paired gap to the reference row, paper, seeds, status."""
    ref_key = REFERENCE[study]
    ref = next((s for s in summary if row_key(s["row"]) == ref_key), None)
    ref_paper = ref["row"].paper_err if ref else None
    ref_label = ref["row"].label if ref else "?"
    lines = [
        f"Top-1 validation error (%): mean over seeds and sample std. \"Gap\" is to row {ref_label}: "
        f"ours is paired (the mean over the seeds both rows finished of this row's error minus the "
        f"reference's on the same seed, ± the std of those differences), the paper's is the "
        f"difference of its numbers. \"-\": the training diverged (a non-finite loss), as the paper's "
        f"\"-\" for a run that cannot converge.",
        "",
        "| row | ours: top-1 err | ours: std | ours: gap (paired) | paper: top-1 err | paper: gap | seeds | status |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    missing = []
    for s in summary:
        row = s["row"]
        if not s["runs"]:
            missing.append(row)
            ours, std, gap = "missing", "", ""
        else:
            ours, std = fmt(s["mean"]), fmt(s["std"])
            g, gstd, _ = paired_gap(s, ref)
            gap = fmt(g, signed=True) + (f" ± {gstd:.2f}" if gstd is not None else "")
        paper = fmt(row.paper_err)
        paper_gap = fmt(row.paper_err - ref_paper, signed=True) if row.paper_err is not None and ref_paper is not None else "-"
        lines.append(f"| {row.label} | {ours} | {std} | {gap} | {paper} | {paper_gap} | {_seeds(s)} | {status_text(s)} |")
    return lines, missing


def _figure1b_lines(summary: list[dict]) -> tuple[list[str], list[Row]]:
    """Figure 1(b): one row per method, the mean error at each normalization batch size."""
    sizes = list(FIGURE1B_SIZES)
    head = "| method | " + " | ".join(f"b={b}" for b in sizes) + " |"
    rule = "|---|" + "---:|" * len(sizes)
    cell = {(s["row"].label.split(",")[0], s["row"].swept_value): s for s in summary}
    lines = ["Top-1 validation error (%), mean over seeds (± sample std), against the normalization batch "
             "size b inside the same gradient batch of 32. \"-\": diverged; \"missing\": no run.", "",
             head, rule]
    for method in FIGURE1B_METHODS:
        vals = []
        for b in sizes:
            s = cell.get((method, b))
            if s is None or not s["runs"]:
                vals.append("missing")
            else:
                vals.append(fmt(s["mean"]) + (f" ± {s['std']:.2f}" if s["std"] is not None else ""))
        lines.append(f"| {method} | " + " | ".join(vals) + " |")
    lines += ["", "The paper's numbers (ImageNet, ResNet-50; Figure 1(b) is a plot, Table 1 gives these):", "",
              head, rule]
    for method, (_, paper) in FIGURE1B_METHODS.items():
        lines.append(f"| {method} | " + " | ".join(fmt(paper.get(b)) if b in paper else "n/a" for b in sizes) + " |")
    lines += ["", "Runs per point:", "", "| method | b | seeds | status |", "|---|---:|---|---|"]
    missing = []
    for s in summary:
        if not s["runs"]:
            missing.append(s["row"])
        lines.append(f"| {s['row'].label.split(',')[0]} | {s['row'].swept_value} | {_seeds(s)} | {status_text(s)} |")
    return lines, missing


def _convergence_lines(summary: list[dict]) -> tuple[list[str], list[Row]]:
    """The convergence check: each row's error at every schedule length, and the change when
    the schedule is doubled."""
    lines = [f"Top-1 validation error (%) at the protocol's schedule and at longer ones, mean over seeds "
             f"(± sample std). A schedule is converged when doubling it changes each row's mean error by "
             f"less than {CONVERGENCE_TOLERANCE} points. The change's standard error is "
             f"sqrt(std_1^2 / n_1 + std_2^2 / n_2) from the two lengths' seed spreads (n seeds each): a "
             f"change within about two of them is not distinguishable from seed noise.", "",
             "| row | iterations | ours: top-1 err | ours: std | change from half as long | std. error of the change | seeds | status |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    by_len = {row_key(s["row"]): s for s in summary}
    verdicts = []
    for s in summary:
        key, iters = row_key(s["row"])
        half = by_len.get((key, iters // 2)) if iters % 2 == 0 else None
        change = se = None
        if half is not None and s["mean"] is not None and half["mean"] is not None:
            change = s["mean"] - half["mean"]
            if s["std"] is not None and half["std"] is not None:
                se = math.sqrt(s["std"] ** 2 / len(s["errs"]) + half["std"] ** 2 / len(half["errs"]))
            verdicts.append((s["row"].label, iters // 2, iters, change))
        lines.append(f"| {s['row'].label} | {iters} | {fmt(s['mean'])} | {fmt(s['std'])} | "
                     f"{fmt(change, signed=True)} | {fmt(se)} | {_seeds(s)} | {status_text(s)} |")
    lines.append("")
    for label, short, long_, change in verdicts:
        ok = abs(change) < CONVERGENCE_TOLERANCE
        lines.append(f"- {label}: {short} -> {long_} iterations changes the mean error by {change:+.2f} points: "
                     + ("converged" if ok else f"NOT converged (|change| >= {CONVERGENCE_TOLERANCE})") + ".")
    return lines, []


#: Two-sided 95% quantiles of Student's t by degrees of freedom (n seeds - 1), from the t table.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def claim_verdict(kind: str, diffs: list[float]) -> tuple[str, float | None, float | None]:
    """Our verdict on one paper claim from the per-seed differences err(a) - err(b): the verdict,
    the mean difference and the half-width of its 95% confidence interval (None below 2 seeds).

    "higher" / "lower" agree when the whole interval lies on the claimed side of zero and
    disagree when it lies on the other side; "equal" agrees when the interval contains zero
    (no difference resolved: read its width) and disagrees when it does not. Otherwise, and with a
    single seed, the runs cannot tell."""
    if not diffs:
        return "not run", None, None
    g = statistics.mean(diffs)
    if len(diffs) < 2:
        return "one seed: cannot tell", g, None
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    lo, hi = g - half, g + half
    if kind == "equal":
        return ("agrees (no difference resolved)" if lo <= 0 <= hi else "**disagrees** (a difference resolved)"), g, half
    sign = 1 if kind == "higher" else -1
    if sign * lo > 0 and sign * hi > 0:
        return "agrees", g, half
    if sign * lo < 0 and sign * hi < 0:
        return "**disagrees** (the opposite difference resolved)", g, half
    return ("cannot tell (same sign, interval includes 0)" if sign * g > 0
            else "cannot tell (opposite sign, interval includes 0)"), g, half


def _claims_lines(study: str, summary: list[dict]) -> list[str]:
    """The paper's claims (studies.CLAIMS) against our runs: paired gap, 95% interval, verdict."""
    claims = CLAIMS.get(study)
    if not claims:
        return []
    by_key = {row_key(s["row"]): s for s in summary}
    lines = ["## The paper's claims against these runs", "",
             "Gap: err(first row) - err(second row), paired over the seeds both finished, with the "
             "half-width of its 95% confidence interval (Student's t, n - 1 degrees of freedom). "
             "Claims that one row's error is higher or lower agree when the whole interval is on "
             "the paper's side of 0; claims of no difference agree when it contains 0 (then its "
             "width says how small a difference the runs could have seen).", "",
             "| claim | paper: gap | ours: gap | 95% interval | seeds | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for c in claims:
        sa = by_key.get(c.a)
        if c.kind == "diverges":
            if sa is None or not sa["runs"]:
                verdict, ours = "not run", "-"
            else:
                nd, nf = len(sa["diverged"]), len(sa["errs"])
                ours = f"{nd} of {len(sa['runs'])} diverged" + (f"; finished at {fmt(sa['mean'])}" if nf else "")
                verdict = ("agrees" if nd and not nf and not sa["other"] else
                           "**disagrees** (it converges)" if nf and not nd else "mixed")
            lines.append(f"| {c.text} | - (cannot converge) | {ours} | | {_seeds(sa) if sa else 'none'} | {verdict} |")
            continue
        sb = by_key.get(c.b)
        diffs = paired_diffs(sa, sb)
        verdict, g, half = claim_verdict(c.kind, diffs)
        paper_gap = (sa["row"].paper_err - sb["row"].paper_err
                     if sa and sb and None not in (sa["row"].paper_err, sb["row"].paper_err) else None)
        lines.append(f"| {c.text} | {fmt(paper_gap, signed=True)} | {fmt(g, signed=True)} | "
                     f"{'± ' + fmt(half) if half is not None else '-'} | {len(diffs)} | {verdict} |")
    return lines + [""]


def render(study: str, summary: list[dict], runs_dir: str, title: str | None, notes: str | None,
           command: str) -> str:
    """The study's markdown file: title, notes, the command that made it, the study's table, the
    paper's claims, the missing configurations and the runs' provenance."""
    lines = [f"# {title or study}", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    lines += [f"Collected by `{command}` from the run directories under {runs_dir}.", ""]
    body = {"figure1b": _figure1b_lines, "convergence": _convergence_lines}.get(study)
    table, missing = body(summary) if body else _table_lines(study, summary)
    lines += table + [""]
    lines += _claims_lines(study, summary)
    if missing:
        lines += ["Missing configurations (no run directory found): "
                  + ", ".join(f"`{m.key}`" + (f" ({swept_name(study)}={m.swept_value})" if m.swept_value else "")
                              for m in missing) + ".", ""]
    lines += _provenance([r for s in summary for r in s["runs"]])
    return "\n".join(lines)


def _provenance(all_runs: list[dict]) -> list[str]:
    """Hosts, commits, versions, model, data, schedule, first start, last end and the summed wall
    time, from the runs themselves."""
    if not all_runs:
        return []
    hosts = sorted({r["env"].get("host", "?") for r in all_runs})
    commits = sorted({(r["env"].get("git_commit") or "?")[:10] + ("+dirty" if r["env"].get("git_dirty") else "") for r in all_runs})
    torch_v = sorted({(r["env"].get("packages") or {}).get("torch") or "?" for r in all_runs})
    starts = sorted(r["metrics"].get("started_at", "") for r in all_runs if r["metrics"].get("started_at"))
    ends = sorted(r["metrics"].get("ended_at", "") for r in all_runs if r["metrics"].get("ended_at"))
    wall = sum(float(r["metrics"].get("wall_time_s") or 0) for r in all_runs)
    iters = sorted({r["config"]["schedule"]["iterations"] for r in all_runs})
    cfg0 = all_runs[0]["config"]
    return [
        "Runs: " + f"{len(all_runs)} run directories; host(s) {', '.join(hosts)}; git {', '.join(commits)}; "
        f"torch {', '.join(torch_v)}; model {cfg0['model']['arch']} (small_input={cfg0['model']['small_input']}), "
        f"data {cfg0['data']['name']} {cfg0['data'].get('root') or ''} at {cfg0['data']['image_size']} px, "
        f"{'/'.join(map(str, iters))} iterations of {cfg0['data']['batch_size']} images"
        + (f"; first start {starts[0]}, last end {ends[-1]}" if starts and ends else "")
        + (f"; summed wall time {wall / 60:.1f} min" if wall else "") + ".",
        "",
    ]


def plot_figure1b(summary: list[dict], path: str) -> None:
    """Error against normalization batch size, one line per method with its seed spread (the
    band between the best and the worst seed), the paper's numbers as crosses; drawn like the
    paper's Figure 1(b) (log2 x axis, b = 32 on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, method in enumerate(FIGURE1B_METHODS):
        color = f"C{i}"
        ss = [s for s in summary if s["row"].label.split(",")[0] == method and s["errs"]]
        if ss:
            b = [s["row"].swept_value for s in ss]
            ax.plot(b, [s["mean"] for s in ss], marker="o", color=color, label=f"{method} (ours)")
            ax.fill_between(b, [min(s["errs"]) for s in ss], [max(s["errs"]) for s in ss], color=color,
                            alpha=0.2, linewidth=0)
        paper = FIGURE1B_METHODS[method][1]
        if paper:
            ax.scatter(list(paper), list(paper.values()), marker="x", s=40, color=color, label=f"{method} (paper)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(FIGURE1B_SIZES), [str(b) for b in FIGURE1B_SIZES])
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
    p.add_argument("runs_dir", nargs="+",
                   help="folder(s) holding the study's run directories (searched recursively); give "
                        "another study's folder too to use its runs of the same configurations "
                        "(mabn.lab.studies.SAME_AS; for Figure 1(b), Table 2's runs at b = 2)")
    p.add_argument("--seeds", help="comma-separated seeds: only these runs are collected")
    p.add_argument("--out", help="markdown file (default results/<study>.md)")
    p.add_argument("--title")
    p.add_argument("--notes", help="markdown file whose text goes under the title (protocol, machine)")
    args = p.parse_args(argv)
    for d in args.runs_dir:
        if not os.path.isdir(d):
            print(f"runs_dir {d!r} is not a directory", file=sys.stderr)
            return 2
    seeds = None
    if args.seeds is not None:
        try:
            seeds = {int(v) for v in args.seeds.split(",")}
        except ValueError:
            print(f"--seeds {args.seeds!r} is not a comma-separated list of integers", file=sys.stderr)
            return 2
    out = args.out or os.path.join("results", f"{args.study}.md")
    notes = open(args.notes).read() if args.notes else None
    command = "python scripts/collect_results.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    runs = [r for d in args.runs_dir for r in find_runs(d)
            if seeds is None or r["config"].get("seed") in seeds]
    summary = summarize(STUDIES[args.study], runs, args.study)
    text = render(args.study, summary, ", ".join(f"`{d}`" for d in args.runs_dir), args.title, notes, command)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    files.atomic_write({out: text})
    print(text)
    if args.study == "figure1b":
        png = os.path.splitext(out)[0] + ".png"
        plot_figure1b(summary, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
