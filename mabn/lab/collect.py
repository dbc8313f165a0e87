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
- det_table3 (scripts/train_detection.py, configs/study/det_table3.yaml): one line per row of the
  paper's Table 3 with box and mask AP, AP50, AP75 (mean ± std over seeds), the paired box-AP gap
  to SyncBN, the paper's box / mask AP, and the claims (higher is better here: a claim "higher"
  says the first row's AP is larger); det_convergence: the detection protocol's convergence
  check on box AP (converged when every change is below 1 point).

- row5_probe / brn_b32_probe: Table 2's BRN rows with one setting changed at a time, keyed by a
  tuple of settings (``studies.SWEPT_KEY``), laid out as Table 2, with their claims.

Each study compares one measure (``studies.MEASURE``: the top-1 error, or the box AP); a claim may
name another (the mask AP).

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
import csv
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys

import numpy as np
import yaml

from mabn.detection.coco_eval import SPLIT_EVAL_FILE
from mabn.engine import files

from .ap_matches import AP_REPLICATES, paired_ap_bootstrap, read_matches
from .studies import (BOX_AP, CLAIMS, COLLAPSE_RISE, EQUIVALENCE_MARGIN, FIGURE1B_METHODS, FIGURE1B_SIZES, REFERENCE,
                      IOU_TYPE, SAME_AS, SHOWN, STUDIES, SWEPT_KEY, TOLERANCE, TOP1, Measure, Row, measure_of)
from .verdicts import BOOTSTRAP_REPLICATES, decide, paired_bootstrap, t_interval


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
            env = read_json_if_any(os.path.join(dirpath, "env.json")) or {}
            runs.append({"dir": os.path.relpath(dirpath, root), "root": root, "metrics": metrics,
                         "config": config, "env": env,
                         "predictions": read_predictions(os.path.join(dirpath, "val_predictions.csv")),
                         "loss_rise": loss_rise(os.path.join(dirpath, "train_log.jsonl")),
                         "matches": {t: read_matches(dirpath, t) for t in IOU_TYPE.values()},
                         "train_eval": read_json_if_any(os.path.join(dirpath, SPLIT_EVAL_FILE.format(split="train")))})
    return runs


def read_json_if_any(path: str) -> dict | None:
    """The JSON object in ``path`` (a run's ``env.json``, a detection run's ``train_eval.json``), or None
    without the file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def loss_rise(path: str) -> tuple[float, int] | None:
    """The largest rise of a run's logged training loss above its lowest value so far, and the
    iteration it peaked at (``train_log.jsonl``); None without the file."""
    if not os.path.exists(path):
        return None
    lowest, rise, at = math.inf, 0.0, 0
    with open(path) as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            if "loss" in row and math.isfinite(row["loss"]):
                lowest = min(lowest, row["loss"])
                if row["loss"] - lowest > rise:
                    rise, at = row["loss"] - lowest, row["iteration"]
    return rise, at


def read_predictions(path: str) -> np.ndarray | None:
    """A run's final validation predictions (``val_predictions.csv``: index, target, prediction),
    as an (images, 2) array of target and prediction in index order; None without the file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: the index column is not 0..{len(rows) - 1}")
    return np.array([[int(r["target"]), int(r["prediction"])] for r in rows], dtype=np.int64)


def one_run_per_seed(runs: list[dict], study: str) -> tuple[list[dict], list[dict]]:
    """(runs kept, runs set aside): of several runs of one configuration and seed (the same run
    kept in two folders given, or trained again on another machine), the first in the order the
    folders were given counts; a seed is never counted twice."""
    kept, seen, set_aside = [], set(), []
    for r in runs:
        key = (run_key(r, study), r["config"].get("seed"))
        (set_aside if key in seen else kept).append(r)
        seen.add(key)
    return kept, set_aside


def run_key(run: dict, study: str) -> tuple[str, object]:
    """The configuration a run belongs to: its preset and the value of the study's swept setting
    (``studies.SWEPT_KEY``: Figure 1(b)'s normalization batch size, the convergence check's
    schedule length, a probe's tuple of settings; None for a study that sweeps only presets)."""
    cfg = run["config"]
    if study not in SWEPT_KEY:
        return cfg["name"], None
    keys = SWEPT_KEY[study]
    values = tuple(_config_value(cfg, k) for k in (keys if isinstance(keys, tuple) else (keys,)))
    return cfg["name"], values if isinstance(keys, tuple) else values[0]


def _config_value(cfg: dict, dotted: str):
    section, field = dotted.split(".")
    return cfg[section][field]


def swept_name(study: str) -> str:
    """The swept setting's field name(s) as the tables print them (``norm_batch_size``)."""
    keys = SWEPT_KEY[study]
    return ", ".join(k.rsplit(".", 1)[-1] for k in (keys if isinstance(keys, tuple) else (keys,)))


def row_key(row: Row) -> tuple[str, int | None]:
    """A row's configuration, keyed like :func:`run_key`."""
    return row.key, row.swept_value


def fmt(x, digits=2, signed=False):
    """``x`` with ``digits`` decimals (a sign with ``signed``); "-" for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _summary(row: Row, rs: list[dict], measures: tuple[Measure, ...], same_as: str | None = None) -> dict:
    """A row's runs and its numbers: per seed, mean and std of the study's measure (``errs``,
    ``by_seed``, ``mean``, ``std``: measures[0], the error for the classifier's studies) and of
    every measure shown (``of[key]``: the same entries)."""
    rs = sorted(rs, key=lambda r: r["config"]["seed"])
    key = measures[0].key
    finished = [r for r in rs if r["metrics"].get("status") == "finished" and r["metrics"].get(key) is not None]
    diverged = [r for r in rs if r["metrics"].get("status") == "diverged"]
    of = {m.key: _values(finished, m.key) for m in measures}
    return {
        "row": row, "runs": rs, "diverged": diverged, **of[key], "of": of,
        "other": [r for r in rs if r not in finished and r not in diverged],
        "same_as": same_as,  # the preset whose runs these are (studies.SAME_AS), or None
        "wrong": _wrong_by_seed(finished),  # seed -> 0/1 per validation image, where predictions were kept
        # iou type -> seed -> the final validation's matches (ap_matches), where the run kept them
        "matches": {t: {r["config"]["seed"]: r["matches"][t] for r in finished if r.get("matches", {}).get(t)}
                    for t in IOU_TYPE.values()},
    }


def _wrong_by_seed(finished: list[dict]) -> dict[int, np.ndarray]:
    """Per seed, 1 for each validation image the run's final prediction got wrong (runs with
    val_predictions.csv only)."""
    return {r["config"]["seed"]: (r["predictions"][:, 0] != r["predictions"][:, 1]).astype(np.int64)
            for r in finished if r.get("predictions") is not None}


def _values(finished: list[dict], key: str) -> dict:
    """``errs`` (the values of metrics.json ``key`` in seed order), ``by_seed``, ``mean``, ``std``."""
    done = [r for r in finished if r["metrics"].get(key) is not None]
    values = [float(r["metrics"][key]) for r in done]
    return {"errs": values, "by_seed": {r["config"]["seed"]: float(r["metrics"][key]) for r in done},
            "mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def measures_of(study: str) -> tuple[Measure, ...]:
    """The measures a study's table shows, the one it compares first."""
    return SHOWN.get(study, (measure_of(study),))


def summarize(rows: list[Row], runs: list[dict], study: str) -> list[dict]:
    """One summary per row of the study (per row and schedule length for a convergence check)."""
    measures = measures_of(study)
    by_key = {}
    for run in runs:
        by_key.setdefault(run_key(run, study), []).append(run)
    if study in TOLERANCE:
        return [_summary(dataclasses.replace(row, swept_value=iters), by_key[(row.key, iters)], measures)
                for row in rows for iters in sorted(k[1] for k in by_key if k[0] == row.key)]
    out = []
    for row in rows:
        key = row_key(row)
        alias = SAME_AS.get(key)
        if not by_key.get(key) and alias and by_key.get(alias):
            out.append(_summary(row, by_key[alias], measures, same_as=alias[0]))
        else:
            out.append(_summary(row, by_key.get(key, []), measures))
    return out


def paired_diffs(s: dict | None, ref: dict | None, key: str | None = None) -> list[float]:
    """m(row, seed) - m(reference, seed) for each seed both finished, in seed order, of the study's
    measure m (or of metrics.json ``key``)."""
    if s is None or ref is None:
        return []
    a, b = (s, ref) if key is None else (s["of"][key], ref["of"][key])
    return [a["by_seed"][k] - b["by_seed"][k] for k in sorted(a["by_seed"]) if k in b["by_seed"]]


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
    ref_paper = ref["row"].paper if ref else None
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
        paper = fmt(row.paper)
        paper_gap = fmt(row.paper - ref_paper, signed=True) if row.paper is not None and ref_paper is not None else "-"
        lines.append(f"| {row.label} | {ours} | {std} | {gap} | {paper} | {paper_gap} | {_seeds(s)} "
                     f"| {status_text(s)} |")
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


def _convergence_lines(summary: list[dict], study: str = "convergence") -> tuple[list[str], list[Row]]:
    """A convergence check: each row's value of the study's measure at every schedule length, and
    the change when the schedule is doubled."""
    m, tolerance = measure_of(study), TOLERANCE[study]
    lines = [f"{m.title} at the protocol's schedule and at longer ones, mean over seeds "
             f"(± sample std). A schedule is converged when doubling it changes each row's mean {m.noun} by "
             f"less than {tolerance} points. The change's standard error is "
             f"sqrt(std_1^2 / n_1 + std_2^2 / n_2) from the two lengths' seed spreads (n seeds each): a "
             f"change within about two of them is not distinguishable from seed noise.", "",
             f"| row | iterations | ours: {m.column} | ours: std | change from half as long "
             "| std. error of the change | seeds | status |",
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
        ok = abs(change) < tolerance
        lines.append(f"- {label}: {short} -> {long_} iterations changes the mean {m.noun} by {change:+.2f} points: "
                     + ("converged" if ok else f"NOT converged (|change| >= {tolerance})") + ".")
    return lines, []


def claim_verdict(kind: str, diffs: list[float], margin: float) -> tuple[str, str, float | None, float | None]:
    """Our verdict on one paper claim from the per-seed differences m(a) - m(b): the verdict, the
    test that gave it, the mean difference and the half-width of the test's interval (None below
    2 seeds).

    "higher" / "lower": the 95% Student's t interval over seeds (:func:`verdicts.t_interval`);
    "equal": two one-sided tests against +-``margin`` (:func:`verdicts.tost`, the 90% interval).
    The decision itself is :func:`verdicts.decide`."""
    test = f"TOST ± {margin:g} (90%)" if kind == "equal" else "t (95%)"
    if not diffs:
        return "not run", test, None, None
    g, half = t_interval(diffs, level=0.90 if kind == "equal" else 0.95)
    if half is None:
        return "one seed: cannot tell", test, g, None
    return decide(kind, g - half, g + half, margin), test, g, half


def image_verdict(kind: str, sa: dict | None, sb: dict | None, margin: float, measure: Measure = TOP1) -> str:
    """The claim's cells of the per-image test: the two-way (seeds x images) paired bootstrap of
    the gap on the validation images both rows predicted (the error: :func:`verdicts.paired_bootstrap`
    over val_predictions.csv; box / mask AP: :func:`ap_matches.paired_ap_bootstrap` over
    val_box_matches.json / val_mask_matches.json),
    its interval (95%; 90% for a claim of no difference), the seeds it used and its verdict."""
    level = 0.90 if kind == "equal" else 0.95
    if measure == TOP1:
        wa, wb = (sa or {}).get("wrong", {}), (sb or {}).get("wrong", {})
        if not set(wa) & set(wb):
            return "- | - | 0 | no predictions"
        g, lo, hi, n = paired_bootstrap(wa, wb, level=level)
    else:
        t = IOU_TYPE[measure]
        ma, mb = ((s or {}).get("matches", {}).get(t, {}) for s in (sa, sb))
        if not set(ma) & set(mb):
            return f"- | - | 0 | no {measure.noun} matches"
        g, lo, hi, n = paired_ap_bootstrap(ma, mb, level=level)
    # With one seed the interval holds the images' sampling error only, not the training's.
    verdict = decide(kind, lo, hi, margin) if n > 1 else "one seed: cannot tell"
    return f"{fmt(g, signed=True)} | [{fmt(lo, signed=True)}, {fmt(hi, signed=True)}] | {n} | {verdict}"


def _claims_lines(study: str, summary: list[dict]) -> list[str]:
    """The paper's claims (studies.CLAIMS) against our runs: paired gap, its test, interval and
    verdict over seeds; for the classifier's studies also the per-image bootstrap's."""
    claims = CLAIMS.get(study)
    if not claims:
        return []
    by_key = {row_key(s["row"]): s for s in summary}
    m, margin = measure_of(study), EQUIVALENCE_MARGIN[study]
    per_image = m in (TOP1, BOX_AP)  # a box AP study's mask AP claims get the test too
    lines = ["## The paper's claims against these runs", "",
             f"Gap: {m.short}(first row) - {m.short}(second row), paired over the seeds both finished. "
             f"Claims that one row's {m.noun} is higher or lower are tested with the 95% Student's t "
             f"interval of the mean gap over seeds: they agree when the whole interval is on the paper's "
             f"side of 0. Claims of no difference are equivalence claims, tested with two one-sided tests "
             f"against a margin of ± {margin:g} points (TOST at 5% each: the 90% interval): they agree when "
             f"the interval lies inside the margin and disagree when it lies wholly beyond it."]
    if m == BOX_AP:
        lines += ["", "The last four columns compare the two rows' final detections on the same validation "
                  "images: a paired bootstrap of the AP gap that resamples seeds and images together "
                  f"({AP_REPLICATES} replicates, percentile interval, 95%; 90% for the equivalence claims; "
                  "COCOeval's AP recomputed on each resample from the runs' `val_box_matches.json`, or "
                  "`val_mask_matches.json` for mask AP), over the seeds whose runs kept that file. "
                  "It treats the validation images as a sample once for both "
                  "rows, where the seed-level test takes them as fixed."]
    elif per_image:
        lines += ["", "The last four columns compare the two rows' final predictions on the same validation "
                  "images: a paired bootstrap that resamples seeds and images together "
                  f"({BOOTSTRAP_REPLICATES} replicates, percentile interval, 95%; 90% for the equivalence "
                  "claims), over the seeds whose runs kept `val_predictions.csv`. It treats the 500 images "
                  "as a sample once for both rows, where the seed-level test takes them as fixed."]
    head = "| claim | paper: gap | ours: gap | test | interval | seeds | verdict |"
    rule = "|---|---:|---:|---|---:|---:|---|"
    if per_image:
        head += " images x seeds: gap | interval | seeds | verdict |"
        rule += "---:|---:|---:|---|"
    lines += ["", head, rule]
    for c in claims:
        lines.append(_claim_line(c, by_key, margin, per_image, m))
    return lines + [""]


def _collapse_verdict(sa: dict) -> tuple[str, str]:
    """A "diverges" claim on a row's runs: each run collapsed when it diverged (a non-finite loss)
    or finished after a training-loss rise above ``studies.COLLAPSE_RISE``; the claim agrees when
    every run collapsed and disagrees when none did."""
    finished = [r for r in sa["runs"] if r not in sa["diverged"] and r not in sa["other"]]
    spiked = [r for r in finished if (r["loss_rise"] or (0.0, 0))[0] > COLLAPSE_RISE]
    collapsed = len(sa["diverged"]) + len(spiked)
    ours = f"{len(sa['diverged'])} of {len(sa['runs'])} diverged"
    if spiked:
        ours += ", " + ", ".join(f"loss +{r['loss_rise'][0]:.2f} at iteration {r['loss_rise'][1]}" for r in spiked)
    if finished:
        ours += f"; finished at {fmt(sa['mean'])}"
    if collapsed == len(sa["runs"]):
        return ours, "agrees"
    return ours, "**disagrees** (it converges)" if collapsed == 0 and not sa["other"] else "mixed"


def _claim_line(c, by_key: dict, margin: float, per_image: bool, study_measure: Measure) -> str:
    """One claim's line of the claims table."""
    sa = by_key.get(c.a)
    if c.kind == "diverges":
        ours, verdict = _collapse_verdict(sa) if sa and sa["runs"] else ("-", "not run")
        line = (f"| {c.text} | - (cannot converge) | {ours} | runs: non-finite loss or a loss rise > "
                f"{COLLAPSE_RISE:g} | | {_seeds(sa) if sa else 'none'} | {verdict} |")
        return line + (" | | | |" if per_image else "")
    sb = by_key.get(c.b)
    key = c.measure.key if c.measure else None
    diffs = paired_diffs(sa, sb, key)
    verdict, test, g, half = claim_verdict(c.kind, diffs, margin)
    pa, pb = (_paper(sa["row"], key), _paper(sb["row"], key)) if sa and sb else (None, None)
    paper_gap = pa - pb if None not in (pa, pb) else None
    line = (f"| {c.text} | {fmt(paper_gap, signed=True)} | {fmt(g, signed=True)} | {test} | "
            f"{'± ' + fmt(half) if half is not None else '-'} | {len(diffs)} | {verdict} |")
    return line + (f" {image_verdict(c.kind, sa, sb, margin, c.measure or study_measure)} |" if per_image else "")


def _paper(row: Row, key: str | None) -> float | None:
    """The paper's value of the study's measure (``key`` None) or of metrics.json ``key``."""
    return row.paper if key is None else dict(row.paper_more).get(key)


def _detection_lines(study: str, summary: list[dict]) -> tuple[list[str], list[Row]]:
    """A detection table: per row, box and mask AP (AP, AP50, AP75: mean ± std over seeds), the
    paired gap of the compared measure to the reference row, the paper's AP, seeds, status."""
    ref_key = REFERENCE[study]
    ref = next((s for s in summary if row_key(s["row"]) == ref_key), None)
    shown = measures_of(study)
    kinds = [(m, suffix) for m in shown for suffix in ("", "50", "75")]
    lines = [f"COCO AP (%) on the validation split: mean over seeds ± sample std (AP, AP50, AP75 of boxes "
             f"and masks). \"Gap\" is the paired {shown[0].noun} gap to {ref['row'].label if ref else '?'} (the "
             f"mean over shared seeds of the per-seed difference, ± its std). \"-\": diverged or missing.", "",
             "| row | " + " | ".join(f"{m.column}{suffix}" for m, suffix in kinds)
             + " | gap (paired) | paper: " + " / ".join(m.column for m in shown) + " | seeds | status |",
             "|---|" + "---:|" * (len(kinds) + 2) + "---|---|"]
    missing = []
    for s in summary:
        if not s["runs"]:
            missing.append(s["row"])
        cells = []
        for m, suffix in kinds:
            v = _values([r for r in s["runs"] if r["metrics"].get("status") == "finished"], m.key + suffix)
            cells.append(_mean_std(v["errs"]))
        g, gstd, _ = paired_gap(s, ref)
        gap = fmt(g, signed=True) + (f" ± {gstd:.2f}" if gstd is not None else "")
        paper = " / ".join(fmt(_paper(s["row"], None if i == 0 else m.key)) for i, m in enumerate(shown))
        lines.append(f"| {s['row'].label} | " + " | ".join(cells)
                     + f" | {gap} | {paper} | {_seeds(s)} | {status_text(s)} |")
    return lines + _train_fit_lines(summary, shown), missing


def _train_fit_lines(summary: list[dict], shown: tuple[Measure, ...]) -> list[str]:
    """Where the runs recorded it (``train_eval.json``): each row's final AP on training images
    beside its validation AP, and the generalization gap (training - validation, per seed)."""
    fits = {id(s): {r["config"]["seed"]: r for r in s["runs"] if r["metrics"].get("status") == "finished"
                    and r.get("train_eval")} for s in summary}
    if not any(fits.values()):
        return []
    images = sorted({r["train_eval"].get("images") or "all" for f in fits.values() for r in f.values()}, key=str)
    lines = ["", f"The final models on training images (the first {' / '.join(map(str, images))} of the training "
             "split, evaluation mode, no augmentation: `scripts/eval_detection.py --split train --images N "
             "--record`, each run's `train_eval.json`): AP mean over seeds ± sample std, and the generalization "
             "gap, training minus validation AP of the same run (mean over those seeds ± std).", "",
             "| row | " + " | ".join(f"train {m.column} | {m.column} gap (train - val)" for m in shown) + " | seeds |",
             "|---|" + "---:|---:|" * len(shown) + "---|"]
    for s in summary:
        by_seed = fits[id(s)]
        if not by_seed:
            continue
        cells = []
        for m in shown:
            train = [float(r["train_eval"][m.key]) for r in by_seed.values()]
            gaps = [float(r["train_eval"][m.key]) - float(r["metrics"][m.key]) for r in by_seed.values()]
            cells += [_mean_std(train), _mean_std(gaps, signed=True)]
        lines.append(f"| {s['row'].label} | " + " | ".join(cells) + f" | {','.join(map(str, sorted(by_seed)))} |")
    return lines


def _mean_std(values: list[float], signed: bool = False) -> str:
    """"mean ± sample std" (the std only with two values or more; "-" without any)."""
    if not values:
        return fmt(None)
    std = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return fmt(statistics.mean(values), signed=signed) + std


def render(study: str, summary: list[dict], runs_dir: str, title: str | None, notes: str | None,
           command: str, set_aside: list[dict] = ()) -> str:
    """The study's markdown file: title, notes, the command that made it, the study's table, the
    paper's claims, the missing configurations, the runs set aside and the runs' provenance."""
    lines = [f"# {title or study}", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    lines += [f"Collected by `{command}` from the run directories under {runs_dir}.", ""]
    if study in TOLERANCE:
        table, missing = _convergence_lines(summary, study)
    elif study in SHOWN:
        table, missing = _detection_lines(study, summary)
    elif study == "figure1b":
        table, missing = _figure1b_lines(summary)
    else:
        table, missing = _table_lines(study, summary)
    lines += table + [""]
    lines += _claims_lines(study, summary)
    if missing:
        lines += ["Missing configurations (no run directory found): "
                  + ", ".join(f"`{m.key}`" + (f" ({swept_name(study)}={m.swept_value})" if m.swept_value else "")
                              for m in missing) + ".", ""]
    if set_aside:
        lines += ["Set aside (another run of the same configuration and seed, under a folder given earlier, "
                  "counts): " + ", ".join(f"`{os.path.join(r['root'], r['dir'])}`" for r in set_aside) + ".", ""]
    lines += _provenance([r for s in summary for r in s["runs"]])
    return "\n".join(lines)


def _provenance(all_runs: list[dict]) -> list[str]:
    """Hosts, commits, versions, model, data, schedule, first start, last end and the summed wall
    time, from the runs themselves."""
    if not all_runs:
        return []
    hosts = sorted({r["env"].get("host", "?") for r in all_runs})
    commits = sorted({(r["env"].get("git_commit") or "?")[:10] + ("+dirty" if r["env"].get("git_dirty") else "")
                      for r in all_runs})
    torch_v = sorted({(r["env"].get("packages") or {}).get("torch") or "?" for r in all_runs})
    metrics = [r["metrics"] for r in all_runs]  # a resumed run's totals when recorded, else its last invocation's
    starts = sorted(m.get("first_started_at") or m["started_at"] for m in metrics if m.get("started_at"))
    ends = sorted(m["ended_at"] for m in metrics if m.get("ended_at"))
    wall = sum(float(m.get("total_wall_time_s") or m.get("wall_time_s") or 0) for m in metrics)
    iters = sorted({r["config"]["schedule"]["iterations"] for r in all_runs})
    cfg0 = all_runs[0]["config"]
    model, data = cfg0["model"], cfg0["data"]
    datasets = sorted({f"{d['name']} {d.get('root') or ''}".rstrip() for d in (r["config"]["data"] for r in all_runs)})
    shape = (f"(small_input={model['small_input']})" if "small_input" in model
             else f"({model.get('backbone')} at base width {model.get('backbone_width')})")
    return [
        "Runs: " + f"{len(all_runs)} run directories; host(s) {', '.join(hosts)}; git {', '.join(commits)}; "
        f"torch {', '.join(torch_v)}; model {model['arch']} {shape}, "
        f"data {', '.join(datasets)} at {data.get('image_size') or model.get('min_size')} px, "
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
    runs, set_aside = one_run_per_seed(runs, args.study)
    summary = summarize(STUDIES[args.study], runs, args.study)
    text = render(args.study, summary, ", ".join(f"`{d}`" for d in args.runs_dir), args.title, notes, command,
                  set_aside)
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
