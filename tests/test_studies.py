"""The study multiruns expand to exactly the paper's table rows; the collector builds the tables."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mabn.lab import collect as collect_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's rows, written from Tables 2 and 4 (appendix B.2): (form, weight centralization,
# fp statistics, bp statistics, normalization batch, alpha); buffer 16 with SMA.
TABLE2 = {
    "table2_row1_bn_regular": ("vanilla", False, "batch", "batch", 32, 0.9),
    "table2_row2_modified_regular": ("modified", True, "batch", "batch", 32, 0.9),
    "table2_row3_bn_small": ("vanilla", False, "batch", "batch", 2, 0.9),
    "table2_row4_brn": ("vanilla", False, "ema", "batch", 2, 0.9),
    "table2_row5_brn_sma": ("vanilla", False, "ema", "sma", 2, 0.98),
    "table2_row6_modified_small": ("modified", True, "batch", "batch", 2, 0.9),
    "table2_row7_modified_ema": ("modified", True, "ema", "batch", 2, 0.9),
    "table2_row8_mabn": ("modified", True, "ema", "sma", 2, 0.98),
}
TABLE4 = {
    "table4_row1_mabn": ("modified", True, "ema", "sma", 2, 0.98),
    "table4_row2_wc_sma_sma": ("modified", True, "sma", "sma", 2, 0.98),
    "table4_row3_wc_ema_ema": ("modified", True, "ema", "ema", 2, 0.9),
    "table4_row4_wc_ema_bs": ("modified", True, "ema", "batch", 2, 0.9),
    "table4_row5_wc_bs_bs": ("modified", True, "batch", "batch", 2, 0.9),
    "table4_row6_ema_sma": ("modified", False, "ema", "sma", 2, 0.98),
    "table4_row7_ema_bs": ("modified", False, "ema", "batch", 2, 0.9),
    "table4_row8_bs_bs": ("modified", False, "batch", "batch", 2, 0.9),
    "table4_row9_bn_small": ("vanilla", False, "batch", "batch", 2, 0.9),
    "table4_row10_wc_bn_small": ("vanilla", True, "batch", "batch", 2, 0.9),
    "table4_row11_modified_regular": ("modified", False, "batch", "batch", 32, 0.9),
}


def dry_run(tmp_path, *overrides):
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "train_imagenet.py", "-m", *overrides, f"data.root={root}", "dry_run=true",
         f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line[len("DRY-RUN "):]) for line in proc.stdout.splitlines() if line.startswith("DRY-RUN ")]


def settings(cfg):
    n = cfg["norm"]
    return (n["form"], n["weight_centralization"], n["fp_stats"], n["bp_stats"], n["norm_batch_size"], n["alpha"])


@pytest.mark.parametrize("study,expected", [("table2", TABLE2), ("table4", TABLE4)])
def test_table_studies_expand_to_exactly_their_rows(tmp_path, study, expected):
    jobs = dry_run(tmp_path, f"+study={study}")
    assert sorted(c["name"] for c in jobs) == sorted(expected)
    for cfg in jobs:
        assert settings(cfg) == expected[cfg["name"]], cfg["name"]
        assert cfg["norm"]["layer"] == "batchstat"
        if "sma" in (cfg["norm"]["fp_stats"], cfg["norm"]["bp_stats"]):
            assert cfg["norm"]["buffer_size"] == 16
        # The paper's setting (appendix B.2).
        assert (cfg["model"]["arch"], cfg["data"]["batch_size"], cfg["schedule"]["iterations"]) == ("resnet50", 32, 600000)
        assert cfg["out_dir"] == f"runs/{study}/{cfg['name']}/seed0"


def test_figure1b_reference_protocol_and_convergence_expansion(tmp_path):
    jobs = dry_run(tmp_path, "+study=figure1b")
    got = sorted((c["name"], c["norm"]["norm_batch_size"]) for c in jobs)
    assert got == sorted((name, b) for name in ("table2_row3_bn_small", "table2_row4_brn", "table2_row8_mabn")
                         for b in (2, 4, 8, 16, 32))
    assert len({c["out_dir"] for c in jobs}) == 15
    # The reference protocol keeps the rows' normalization and swaps model, data and schedule.
    jobs = dry_run(tmp_path, "+study=table2", "+protocol=r8_32px", "seed=0,1,2")
    assert len(jobs) == 24 and {c["seed"] for c in jobs} == {0, 1, 2}
    for cfg in jobs:
        assert settings(cfg) == TABLE2[cfg["name"]]
        assert (cfg["model"]["arch"], cfg["data"]["name"], cfg["data"]["image_size"], cfg["data"]["augment"]) == \
            ("resnet8", "imagefolder", 32, "crop_flip")
        s = cfg["schedule"]
        assert (s["iterations"], s["policy"], s["warmup_iters"], cfg["optim"]["lr"]) == (12000, "linear", 1800, 0.05)
    # The convergence check: BN(32) and MABN(2) at the protocol's schedule and at twice its length.
    jobs = dry_run(tmp_path, "+study=convergence", "+protocol=r8_32px", "seed=0,1")
    got = sorted((c["name"], c["schedule"]["iterations"], c["schedule"]["warmup_iters"], c["seed"]) for c in jobs)
    assert got == sorted((name, it, it * 3 // 20, seed) for name in ("table2_row1_bn_regular", "table2_row8_mabn")
                         for it in (12000, 24000) for seed in (0, 1))
    assert len({c["out_dir"] for c in jobs}) == 8
    assert all(c["model"]["arch"] == "resnet8" for c in jobs)


def make_run(root, name, seed, status, err=None, nbs=2, diverged_at=None, iterations=600):
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = {"name": name, "seed": seed, "norm": {"norm_batch_size": nbs},
           "model": {"arch": "resnet18", "small_input": True},
           "data": {"name": "imagefolder", "root": "/data/tiny", "image_size": 32, "batch_size": 32},
           "schedule": {"iterations": iterations}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"status": status, "iteration": iterations if status == "finished" else (diverged_at or 10),
               "val_top1_err": err, "wall_time_s": 60.0}
    if diverged_at:
        metrics["diverged_at"] = diverged_at
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "env.json").write_text(json.dumps({"host": "box", "git_commit": "abcdef0123456", "git_dirty": False,
                                            "packages": {"torch": "2.x"}}))
    return d


def table_lines(text):
    return {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}


def test_collector_on_fabricated_runs(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "table2_row1_bn_regular", 0, "finished", 40.0, nbs=32)
    make_run(runs, "table2_row1_bn_regular", 1, "finished", 42.0, nbs=32)
    make_run(runs, "table2_row1_bn_regular", 2, "finished", 43.0, nbs=32)
    resumed = make_run(runs, "table2_row2_modified_regular", 0, "finished", 41.5, nbs=32)
    m = json.loads((resumed / "metrics.json").read_text())  # a resumed run: its totals over 3 invocations
    m.update(total_wall_time_s=300.0, invocations=3)
    (resumed / "metrics.json").write_text(json.dumps(m))
    make_run(runs, "table2_row3_bn_small", 0, "finished", 55.0)
    make_run(runs, "table2_row3_bn_small", 1, "finished", 58.0)
    make_run(runs, "table2_row3_bn_small", 3, "finished", 70.0)  # seed 3: no partner in row 1
    make_run(runs, "table2_row4_brn", 0, "finished", 50.0)
    make_run(runs, "table2_row5_brn_sma", 0, "diverged", None, diverged_at=137)
    make_run(runs, "table2_row6_modified_small", 0, "finished", 48.0)
    make_run(runs, "table2_row7_modified_ema", 0, "interrupted", None)
    # table2_row8_mabn: missing
    out = tmp_path / "table2.md"
    args = ["table2", str(runs), "--out", str(out), "--title", "T2"]
    assert collect_results.main(args) == 0
    text = out.read_text()
    lines = table_lines(text)
    # Row 1: mean of 40, 42, 43 = 41.67, sample std 1.53; gap to itself 0 over 3 seeds.
    assert lines["1 BN, regular (b=32)"] == \
        "| 1 BN, regular (b=32) | 41.67 | 1.53 | +0.00 ± 0.00 | 23.41 | +0.00 | 0,1,2 | 3 finished |"
    # Row 3: mean (55 + 58 + 70) / 3 = 61.00, std 7.94; paired gap over seeds 0, 1 only:
    # (55 - 40, 58 - 42) = (15, 16) -> +15.50 ± 0.71 (not 61.00 - 41.67).
    assert lines["3 BN"] == "| 3 BN | 61.00 | 7.94 | +15.50 ± 0.71 | 35.22 | +11.81 | 0,1,3 | 3 finished |"
    assert lines["4 vanilla + EMAS in FP (BRN)"].startswith("| 4 vanilla + EMAS in FP (BRN) | 50.00 | - | +10.00 | 30.29 | +6.88 | 0 |")
    assert lines["5 vanilla + EMAS in FP + SMAS in BP"] == \
        "| 5 vanilla + EMAS in FP + SMAS in BP | - | - | - | - | - | 0 | 1 diverged (iteration 137) |"
    assert "interrupted at iteration 10" in lines["7 modified + EMAS in FP"]
    assert lines["8 modified + EMAS in FP + SMAS in BP (MABN)"].startswith(
        "| 8 modified + EMAS in FP + SMAS in BP (MABN) | missing |")
    assert "Missing configurations (no run directory found): `table2_row8_mabn`." in text
    # The claims table: 3 vs 1 over seeds 0, 1: differences 15, 16 -> mean 15.50, std 0.7071,
    # half-width t(0.975, 1) * 0.7071 / sqrt(2) = 12.706 * 0.5 = 6.35; interval above 0: agrees.
    assert ("| Table 1 / 5.1: BN with a small batch severely worsens the model (3 vs 1) | +11.81 | +15.50 "
            "| t (95%) | ± 6.35 | 2 | agrees | - | - | 0 | no predictions |") in text
    assert ("| 5.1: SMAS in BP with BRN collapses during training (row 5) | - (cannot converge) | 1 of 1 diverged "
            "| runs: non-finite loss or a loss rise > 1 | | 0 | agrees | | | |") in text
    assert "(8 vs 1) | +0.17 | - | TOST ± 1.5 (90%) | - | 0 | not run |" in text  # row 8 missing
    assert "(2 vs 1) | +0.12 | +1.50 | TOST ± 1.5 (90%) | - | 1 | one seed: cannot tell |" in text
    # 11 runs of 60 s each, but the resumed one counts its 300 s over all its invocations: 900 s
    assert "summed wall time 15.0 min" in text
    # Deterministic: the same runs give the same file.
    assert collect_results.main(args) == 0
    assert out.read_text() == text


def test_collector_figure1b_table_and_plot(tmp_path):
    runs = tmp_path / "runs"
    for b in (2, 32):
        for seed, delta in ((0, 0.0), (1, 1.0)):
            make_run(runs / f"b{b}", "table2_row8_mabn", seed, "finished", 40.0 + b / 10 + delta, nbs=b)
        make_run(runs / f"b{b}", "table2_row3_bn_small", 0, "finished", 60.0 - b, nbs=b)
    make_run(runs / "b4", "table2_row4_brn", 0, "diverged", None, nbs=4, diverged_at=12)
    out = tmp_path / "figure1b.md"
    assert collect_results.main(["figure1b", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| method | b=2 | b=4 | b=8 | b=16 | b=32 |"
    # One row per method, columns b = 2, 4, 8, 16, 32; MABN's b=2: seeds 40.2 and 41.2.
    assert "| BN | 58.00 | missing | missing | missing | 28.00 |" in lines
    assert "| BRN | missing | - | missing | missing | missing |" in lines
    assert "| MABN | 40.70 ± 0.71 | missing | missing | missing | 43.70 ± 0.71 |" in lines
    assert "| BN | 35.22 | n/a | n/a | n/a | 23.41 |" in lines  # the paper's known points
    assert (tmp_path / "figure1b.png").read_bytes()[:4] == b"\x89PNG"
    assert "`table2_row4_brn` (norm_batch_size=2)" in text


def test_collector_convergence_verdict(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        make_run(runs / "x1", "table2_row1_bn_regular", seed, "finished", 30.0 + seed, nbs=32, iterations=100)
        make_run(runs / "x2", "table2_row1_bn_regular", seed, "finished", 29.0 + seed, nbs=32, iterations=200)
        make_run(runs / "x1", "table2_row8_mabn", seed, "finished", 35.0 + seed, iterations=100)
        make_run(runs / "x2", "table2_row8_mabn", seed, "finished", 32.0 + seed, iterations=200)
    make_run(runs / "x2", "table2_row1_bn_regular", 2, "finished", 31.0, nbs=32, iterations=200)
    out = tmp_path / "convergence.md"
    assert collect_results.main(["convergence", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    # 200 iterations: 29, 30, 31 (mean 30, std 1); 100: 30, 31 (mean 30.5, std 0.707). The
    # change's standard error: sqrt(1^2 / 3 + 0.707^2 / 2) = 0.76.
    assert "| 1 BN, regular (b=32) | 200 | 30.00 | 1.00 | -0.50 | 0.76 | 0,1,2 | 3 finished |" in text
    assert "| 1 BN, regular (b=32) | 100 | 30.50 | 0.71 | - | - | 0,1 | 2 finished |" in text
    assert "changes the mean error by -0.50 points: converged." in text
    assert "changes the mean error by -3.00 points: NOT converged" in text


def test_same_as_pairs_are_the_same_configuration(tmp_path):
    """Every studies.SAME_AS pair resolves, under the reference protocol, to the same config but
    the preset's name and output folder: the collector may use one's runs for the other."""
    from mabn.lab.studies import SAME_AS
    jobs = dry_run(tmp_path, "+study=table2", "+protocol=r8_32px", "experiment=" + ",".join(
        sorted({k for k, _ in SAME_AS} | {v for v, _ in SAME_AS.values()})), "norm.norm_batch_size=2,32")
    by_key = {(c["name"], c["norm"]["norm_batch_size"]): c for c in jobs}

    def strip(cfg):
        return {k: v for k, v in cfg.items() if k not in ("name", "out_dir")}

    for (name, b), (other, b_other) in SAME_AS.items():
        # Table 4's rows keep their own normalization batch (2); Figure 1(b) sweeps it.
        b, b_other = b or 2, b_other or 2
        assert strip(by_key[(name, b)]) == strip(by_key[(other, b_other)]), (name, other)


def test_collector_takes_same_configuration_runs_from_another_folder_and_filters_seeds(tmp_path):
    t2, t4 = tmp_path / "table2", tmp_path / "table4"
    for seed in (0, 1, 2):
        make_run(t2, "table2_row8_mabn", seed, "finished", 40.0 + seed)
        make_run(t2, "table2_row3_bn_small", seed, "finished", 60.0 + seed)
    make_run(t4, "table4_row11_modified_regular", 0, "finished", 38.0, nbs=32)
    make_run(t4, "table4_row11_modified_regular", 1, "finished", 39.0, nbs=32)
    make_run(t4, "table4_row9_bn_small", 0, "finished", 70.0)  # its own run wins over Table 2's
    out = tmp_path / "table4.md"
    assert collect_results.main(["table4", str(t4), str(t2), "--seeds", "0,1", "--out", str(out)]) == 0
    lines = table_lines(out.read_text())
    assert lines["1 modified, WC, EMAS / SMAS (MABN)"] == (
        "| 1 modified, WC, EMAS / SMAS (MABN) | 40.50 | 0.71 | +2.00 ± 0.00 | 23.58 | +0.23 | 0,1 | "
        "2 finished; the runs of `table2_row8_mabn` (the same configuration) |")
    assert lines["9 vanilla, BS / BS (BN)"].startswith("| 9 vanilla, BS / BS (BN) | 70.00 | - | +32.00 | 35.22 |")
    assert "table2_row3" not in lines["9 vanilla, BS / BS (BN)"]
    assert lines["2 modified, WC, SMAS / SMAS"].startswith("| 2 modified, WC, SMAS / SMAS | missing |")
    # Figure 1(b): b = 2 from Table 2's runs of the same presets, BN at b = 32 from row 1's.
    make_run(t2, "table2_row1_bn_regular", 0, "finished", 30.0, nbs=32)
    fig = tmp_path / "f1b"
    make_run(fig, "table2_row8_mabn", 0, "finished", 41.0, nbs=4)
    out = tmp_path / "figure1b.md"
    assert collect_results.main(["figure1b", str(fig), str(t2), "--seeds", "0", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| BN | 60.00 | missing | missing | missing | 30.00 |" in text
    assert "| MABN | 40.00 | 41.00 | missing | missing | missing |" in text
    assert collect_results.main(["table4", str(t4), "--seeds", "zero"]) == 2
    assert collect_results.main(["table4", str(t4), str(tmp_path / "nowhere")]) == 2


def test_claim_verdicts_against_the_t_interval_and_tost():
    """claim_verdict against a hand computation of the Student-t intervals: 95% for the
    directional claims, 90% (two one-sided tests at 5%) against the margin for claims of no
    difference."""
    from mabn.lab.collect import claim_verdict
    diffs = [8.0, 10.0, 12.0]  # mean 10, sample std 2, se 2 / sqrt(3); t(0.975, 2) = 4.303
    half = 4.303 * 2.0 / math.sqrt(3.0)  # 4.969: interval [5.03, 14.97]
    v, test, g, h = claim_verdict("higher", diffs, 1.5)
    assert (v, test) == ("agrees", "t (95%)") and g == pytest.approx(10.0) and h == pytest.approx(half, rel=1e-4)
    assert claim_verdict("lower", diffs, 1.5)[0].startswith("**disagrees**")
    # t(0.95, 2) = 2.920: 90% interval 10 ± 3.37 = [6.63, 13.37], wholly beyond 1.5.
    v, test, g, h = claim_verdict("equal", diffs, 1.5)
    assert v == "**disagrees** (a gap beyond ± 1.5 resolved)" and test == "TOST ± 1.5 (90%)"
    assert h == pytest.approx(2.920 * 2.0 / math.sqrt(3.0), rel=1e-3)
    # [-1, 1, 3]: mean 1, std 2: the 90% interval [-2.37, 4.37] reaches past the margin.
    assert claim_verdict("equal", [-1.0, 1.0, 3.0], 1.5)[0] == "cannot tell (the interval reaches past ± 1.5)"
    # ten gaps of 0.2 ± 0.5: 90% interval within (-1.5, 1.5): equivalent. An interval that contains 0
    # but is wide is not: "no difference resolved" is no longer "agrees".
    tight = [0.2 + 0.5 * (-1) ** k for k in range(10)]
    assert claim_verdict("equal", tight, 1.5)[0] == "agrees (equivalent within ± 1.5)"
    assert claim_verdict("higher", [-1.0, 1.0, 3.0], 1.5)[0] == "cannot tell (same sign, interval includes 0)"
    assert claim_verdict("lower", [-1.0, 1.0, 3.0], 1.5)[0] == "cannot tell (opposite sign, interval includes 0)"
    assert claim_verdict("higher", [], 1.5)[0] == "not run"


def test_collector_per_image_bootstrap_columns(tmp_path):
    """Runs that kept val_predictions.csv get the per-image (seeds x images) bootstrap cells; the
    observed gap is the error gap computed from the predictions directly."""
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    target = rng.integers(0, 10, 200)
    for seed in range(3):
        for name, p_wrong in (("table2_row1_bn_regular", 0.30), ("table2_row3_bn_small", 0.45)):
            wrong = rng.random(200) < p_wrong
            pred = np.where(wrong, (target + 1) % 10, target)
            d = make_run(runs, name, seed, "finished", 100 * wrong.mean(), nbs=32 if "row1" in name else 2)
            with open(d / "val_predictions.csv", "w") as f:
                f.write("index,target,prediction\n" + "".join(f"{i},{t},{q}\n" for i, (t, q) in enumerate(zip(target, pred))))
    out = tmp_path / "t2.md"
    assert collect_results.main(["table2", str(runs), "--out", str(out)]) == 0
    line = next(l for l in out.read_text().splitlines() if l.startswith("| Table 1 / 5.1: BN with a small batch"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    ours, image_gap = float(cells[2]), float(cells[7])
    assert image_gap == pytest.approx(ours, abs=0.005)  # same images, same errors: the same mean gap
    lo, hi = (float(x) for x in cells[8].strip("[]").split(","))
    assert lo < image_gap < hi and cells[9] == "3" and cells[10] == "agrees"


def test_every_claim_names_rows_of_its_study():
    from mabn.lab.studies import CLAIMS, STUDIES
    for study, claims in CLAIMS.items():
        paper = {(r.key, r.swept_value): r.paper for r in STUDIES[study]}
        for c in claims:
            assert c.a in paper and (c.b is None or c.b in paper), (study, c)
            assert c.kind in ("higher", "lower", "equal", "diverges")
            if c.b is not None and None not in (paper[c.a], paper[c.b]) and c.kind != "equal":
                gap = paper[c.a] - paper[c.b]
                assert (gap > 0) == (c.kind == "higher"), c  # the paper's own numbers agree


def make_det_run(root, name, seed, box, mask, iterations=3000, status="finished", data="det-tiny10"):
    """A fabricated detection run directory: box / mask AP (and AP50 = AP + 20, AP75 = AP - 5)."""
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = {"name": name, "seed": seed, "norm": {"norm_batch_size": 2},
           "model": {"arch": "mask_rcnn", "backbone": "resnet18", "backbone_width": 16, "min_size": 128},
           "data": {"name": data, "root": f"data/{data}", "batch_size": 8},
           "schedule": {"iterations": iterations}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"status": status, "iteration": iterations, "wall_time_s": 60.0}
    for kind, ap in (("bbox", box), ("segm", mask)):
        metrics.update({f"{kind}_AP": ap, f"{kind}_AP50": ap + 20, f"{kind}_AP75": ap - 5})
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "env.json").write_text(json.dumps({"host": "box", "git_commit": "abcdef0123456", "git_dirty": False,
                                            "packages": {"torch": "2.x"}}))


def test_collector_detection_table3_and_claims(tmp_path):
    runs = tmp_path / "runs"
    for seed, (bn, sync, mabn) in enumerate([(10.0, 14.0, 13.5), (11.0, 15.0, 15.0), (12.0, 16.0, 15.7)]):
        make_det_run(runs, "table3_bn", seed, bn, bn - 1)
        make_det_run(runs, "table3_syncbn", seed, sync, sync - 1)
        make_det_run(runs, "table3_mabn", seed, mabn, mabn - 1)
    out = tmp_path / "table3.md"
    assert collect_results.main(["det_table3", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    lines = table_lines(text)
    # BN: box 10, 11, 12 -> 11.00 ± 1.00, AP50 31.00, AP75 6.00; mask 10.00; paired gap to SyncBN
    # (14, 15, 16): -4 each -> -4.00 ± 0.00; the paper's 30.41 / 27.91.
    assert lines["BN(2)"] == ("| BN(2) | 11.00 ± 1.00 | 31.00 ± 1.00 | 6.00 ± 1.00 | 10.00 ± 1.00 | 30.00 ± 1.00 "
                              "| 5.00 ± 1.00 | -4.00 ± 0.00 | 30.41 / 27.91 | 0,1,2 | 3 finished |")
    assert lines["BRN(2)"].startswith("| BRN(2) | - |") and "`table3_brn`" in text
    # MABN - BN, box: 3.5, 4.0, 3.7 -> mean 3.733, std 0.2517, half-width 4.303 * 0.2517 / sqrt(3)
    # = 0.625: above 0, agrees; the paper's gap 34.85 - 30.41 = +4.44.
    assert "| 5.2: MABN(2) clearly outperforms BN(2), box AP | +4.44 | +3.73 | t (95%) | ± 0.63 | 3 | agrees |" in text
    # The mask claim uses the mask APs (the same differences here) and the paper's 31.61 - 27.91.
    assert "| 5.2: MABN(2) clearly outperforms BN(2), mask AP | +3.70 | +3.73 | t (95%) | ± 0.63 | 3 | agrees |" in text
    # MABN - SyncBN: -0.5, 0, -0.3 -> mean -0.267, std 0.2517; the 90% interval (t(0.95, 2) = 2.920)
    # is -0.267 ± 0.424 = [-0.69, +0.16], inside the margin of ± 1 box AP: equivalent.
    assert ("| 5.2: MABN(2) is comparable with SyncBN, box AP | +0.04 | -0.27 | TOST ± 1 (90%) | ± 0.42 | 3 "
            "| agrees (equivalent within ± 1) |") in text
    assert "| 5.2: MABN(2) outperforms BRN(2), box AP | +2.92 | - | t (95%) | - | 0 | not run |" in text


def test_collector_detection_fit_to_training_images(tmp_path):
    """Runs with train_eval.json (eval_detection.py --split train --record) get a second table: the
    training-image AP and the per-seed gap to the validation AP; rows without it are left out,
    and a table without any keeps no such section."""
    runs = tmp_path / "runs"
    for seed, (mabn, train_box, train_mask) in enumerate([(13.5, 30.0, 28.0), (15.0, 32.0, 29.0)]):
        make_det_run(runs, "table3_bn", seed, 10.0 + seed, 9.0 + seed)
        make_det_run(runs, "table3_mabn", seed, mabn, mabn - 1)
        (runs / "table3_mabn" / f"seed{seed}" / "train_eval.json").write_text(json.dumps(
            {"split": "train", "images": 250, "iteration": 3000, "bbox_AP": train_box, "segm_AP": train_mask}))
    out = tmp_path / "table3.md"
    assert collect_results.main(["det_table3", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert "(the first 250 of the training split" in text
    # train box 30, 32 -> 31.00 ± 1.41; gaps 30 - 13.5 = 16.5, 32 - 15 = 17 -> +16.75 ± 0.35;
    # train mask 28, 29 -> 28.50 ± 0.71; gaps 28 - 12.5 = 15.5, 29 - 14 = 15 -> +15.25 ± 0.35
    assert "| MABN(2) | 31.00 ± 1.41 | +16.75 ± 0.35 | 28.50 ± 0.71 | +15.25 ± 0.35 | 0,1 |" in text
    fit = text.split("(the first 250 of the training split")[1].split("## ")[0]
    assert "| BN(2) |" not in fit
    for seed in (0, 1):
        (runs / "table3_mabn" / f"seed{seed}" / "train_eval.json").unlink()
    assert collect_results.main(["det_table3", str(runs), "--out", str(out)]) == 0
    assert "training split" not in out.read_text()


def test_collector_detection_convergence(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        make_det_run(runs / "x1", "table3_bn", seed, 10.0 + seed, 9.0, iterations=3000)
        make_det_run(runs / "x2", "table3_bn", seed, 10.5 + seed, 9.0, iterations=6000)
        make_det_run(runs / "x1", "table3_mabn", seed, 12.0 + seed, 11.0, iterations=3000)
        make_det_run(runs / "x2", "table3_mabn", seed, 14.0 + seed, 13.0, iterations=6000)
    out = tmp_path / "conv.md"
    assert collect_results.main(["det_convergence", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| BN(2) | 6000 | 11.00 | 0.71 | +0.50 | 0.71 | 0,1 | 2 finished |" in text
    assert "changes the mean box AP by +0.50 points: converged." in text
    assert "changes the mean box AP by +2.00 points: NOT converged (|change| >= 1.0)." in text


def test_collector_detection_data_size_probe(tmp_path):
    """det_data_size keys runs by data.name: the same presets on 2,000 (Table 3's folder) and on
    8,000 training images are separate rows, and the claims pair them by seed."""
    for seed in (0, 1):
        make_det_run(tmp_path / "table3", "table3_bn", seed, 12.0 + seed, 12.0)
        make_det_run(tmp_path / "table3", "table3_mabn", seed, 11.0 + seed, 11.0)
        make_det_run(tmp_path / "size", "table3_bn", seed, 13.0 + seed, 13.0, data="det-tiny10-8k")
        make_det_run(tmp_path / "size", "table3_mabn", seed, 14.0 + 2 * seed, 14.0, data="det-tiny10-8k")
    out = tmp_path / "size.md"
    assert collect_results.main(["det_data_size", str(tmp_path / "size"), str(tmp_path / "table3"),
                                 "--out", str(out)]) == 0
    lines = table_lines(out.read_text())
    # The paired gap to BN(2) on 2,000 images (12, 13): MABN(2) on 8,000 (14, 16) -> +2, +3.
    assert lines["MABN(2), 8,000 training images"].startswith(
        "| MABN(2), 8,000 training images | 15.00 ± 1.41 |"), lines
    assert "| +2.50 ± 0.71 |" in lines["MABN(2), 8,000 training images"]
    assert "| +0.00 ± 0.00 |" in lines["BN(2), 2,000 training images"]
    text = out.read_text()
    # On 2,000 images MABN - BN = -1, -1: the opposite of the claim; on 8,000 +1, +2.
    assert "| 5.2: MABN(2) outperforms BN(2), box AP, on 2,000 training images (Table 3) | - | -1.00 |" in text
    assert "| 5.2: MABN(2) outperforms BN(2), box AP, on 8,000 training images | - | +1.50 |" in text
    assert "| 4x the training images raise MABN(2)'s box AP | - | +3.50 |" in text
    assert "data det-tiny10 data/det-tiny10, det-tiny10-8k data/det-tiny10-8k at 128 px" in text


def test_validation_curves_from_val_logs(tmp_path):
    """scripts/plot_curves.py: each row's curve is the mean over its seeds at every iteration, one
    curve per schedule length."""
    from mabn.lab.curves import plot_curves, study_curves
    runs = tmp_path / "runs"
    for seed in (0, 1):
        make_det_run(runs, "table3_mabn", seed, 10.0, 9.0)
        with open(runs / "table3_mabn" / f"seed{seed}" / "val_log.jsonl", "w") as f:
            for it, ap in ((1000, 2.0 + seed), (2000, 6.0 + seed), (3000, 10.0)):
                f.write(json.dumps({"iteration": it, "bbox_AP": ap, "segm_AP": ap - 1}) + "\n")
    longer = tmp_path / "longer"
    make_det_run(longer, "table3_mabn", 0, 11.0, 10.0, iterations=6000)
    (longer / "table3_mabn" / "seed0" / "val_log.jsonl").write_text(json.dumps({"iteration": 6000, "bbox_AP": 11.0}))
    curves = study_curves([str(longer), str(runs)], "bbox_AP", ["table3_mabn", "table3_bn"])
    assert curves == {("table3_mabn", 3000): {1000: [2.0, 3.0], 2000: [6.0, 7.0], 3000: [10.0, 10.0]},
                      ("table3_mabn", 6000): {6000: [11.0]}}
    out = tmp_path / "curves.png"
    plot_curves(curves, {"table3_mabn": "MABN(2)"}, "box AP", str(out))
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_val_log_has_its_curve_from_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from mabn.lab.curves import run_curve
    w = SummaryWriter(str(tmp_path / "tb"))
    for it, ap in ((1000, 3.5), (2000, 8.5)):
        w.add_scalar("val/bbox_AP", ap, it)
    w.close()
    assert run_curve(str(tmp_path), "bbox_AP") == [(1000, 3.5), (2000, 8.5)]
    assert run_curve(str(tmp_path), "segm_AP") == []


def test_read_predictions_orders_by_index_and_refuses_gaps(tmp_path):
    from mabn.lab.collect import read_predictions
    p = tmp_path / "val_predictions.csv"
    p.write_text("index,target,prediction\n1,3,3\n0,2,5\n")
    assert read_predictions(str(p)).tolist() == [[2, 5], [3, 3]]
    p.write_text("index,target,prediction\n0,2,5\n2,3,3\n")
    with pytest.raises(ValueError, match="index column"):
        read_predictions(str(p))
    assert read_predictions(str(tmp_path / "none.csv")) is None


def test_a_seed_counts_once_the_first_folder_given_wins(tmp_path):
    """The same configuration and seed under two folders (a run kept twice, or trained again on
    another machine): the run under the folder given first counts, the other is listed as set aside."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_run(a, "table2_row1_bn_regular", 0, "finished", 40.0, nbs=32)
    make_run(b, "table2_row1_bn_regular", 0, "finished", 50.0, nbs=32)
    make_run(b, "table2_row1_bn_regular", 1, "finished", 42.0, nbs=32)
    out = tmp_path / "t.md"
    assert collect_results.main(["table2", str(a), str(b), "--out", str(out)]) == 0
    text = out.read_text()
    assert table_lines(text)["1 BN, regular (b=32)"].startswith("| 1 BN, regular (b=32) | 41.00 | 1.41 |")  # 40, 42
    assert f"counts): `{b / 'table2_row1_bn_regular' / 'seed0'}`." in text
    assert collect_results.main(["table2", str(b), str(a), "--out", str(out)]) == 0
    assert table_lines(out.read_text())["1 BN, regular (b=32)"].startswith("| 1 BN, regular (b=32) | 46.00 |")  # 50, 42


def test_loss_rise_is_the_largest_rise_above_the_running_minimum(tmp_path):
    from mabn.lab.collect import loss_rise
    p = tmp_path / "train_log.jsonl"
    rows = [(50, 3.0), (100, 2.0), (150, 2.6), (200, float("nan")), (250, 1.0), (300, 1.9), (350, 0.9)]
    p.write_text("".join(json.dumps({"iteration": i, "loss": v}) + "\n" for i, v in rows) + json.dumps({"iteration": 400}) + "\n")
    rise, at = loss_rise(str(p))
    assert at == 300 and abs(rise - 0.9) < 1e-12  # 1.9 - 1.0 beats 2.6 - 2.0
    assert loss_rise(str(tmp_path / "none.jsonl")) is None


def test_collector_keys_probe_runs_by_a_tuple_of_settings(tmp_path):
    """A probe study sweeps several settings: each run belongs to the row of its (policy, lr,
    r_max); the row "as in Table 2" is found among Table 2's runs."""
    probe, t2 = tmp_path / "probe", tmp_path / "t2"
    for root, name, seed, err, policy, lr, rmax, status in [
            (t2, "table2_row5_brn_sma", 0, 40.0, "linear", 0.05, 3.0, "finished"),
            (t2, "table2_row8_mabn", 0, 39.0, "linear", 0.05, 5.0, "finished"),
            (t2, "table2_row4_brn", 0, 41.0, "linear", 0.05, 3.0, "finished"),  # not a probe row
            (probe, "table2_row5_brn_sma", 0, 46.0, "step", 0.05, 3.0, "finished"),
            (probe, "table2_row8_mabn", 0, 41.0, "step", 0.05, 5.0, "finished"),
            (probe, "table2_row5_brn_sma", 0, None, "linear", 0.2, 3.0, "diverged")]:
        d = make_run(root / f"{policy}_{lr}", name, seed, status, err, diverged_at=900 if status == "diverged" else None)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg.update(schedule={"iterations": 600, "policy": policy}, optim={"lr": lr})
        cfg["norm"]["r_max"] = rmax
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        if policy == "step" and name == "table2_row5_brn_sma":  # a loss spike: 2.0 -> 1.8 -> 3.3
            (d / "train_log.jsonl").write_text("".join(json.dumps({"iteration": i, "loss": v}) + "\n"
                                                       for i, v in ((100, 2.0), (200, 1.8), (300, 3.3), (400, 1.7))))
    out = tmp_path / "probe.md"
    assert collect_results.main(["row5_probe", str(probe), str(t2), "--out", str(out)]) == 0
    lines = table_lines(out.read_text())
    assert lines["row 5 (BRN + SMA in BP), as in Table 2"].startswith("| row 5 (BRN + SMA in BP), as in Table 2 | 40.00 |")
    assert lines["row 5, the paper's step schedule"].startswith("| row 5, the paper's step schedule | 46.00 | - | +7.00 |")
    assert "1 diverged (iteration 900)" in lines["row 5, lr 0.2"]
    assert lines["row 5, no renorm clipping (r_max = d_max = 1000)"].startswith(
        "| row 5, no renorm clipping (r_max = d_max = 1000) | missing |")
    text = out.read_text()
    rule = "runs: non-finite loss or a loss rise > 1"
    assert f"| 5.1: row 5 collapses, lr 0.2 | - (cannot converge) | 1 of 1 diverged | {rule} | | 0 | agrees |" in text
    assert (f"| 5.1: row 5 collapses, the paper's step schedule | - (cannot converge) | 0 of 1 diverged, "
            f"loss +1.50 at iteration 300; finished at 46.00 | {rule} | | 0 | agrees |") in text
    assert "| row 5 worse than MABN (row 8), the paper's step schedule | - | +5.00 | t (95%) | - | 1 |" in text
    assert "(policy, lr, r_max=('linear', 0.05, 1000.0))" in text


def test_detection_claims_get_the_per_image_box_ap_bootstrap(tmp_path):
    """Runs that kept val_box_matches.json get the images x seeds columns: the observed gap is the
    mean over seeds of the recomputed box APs' difference; the mask AP claims read
    val_mask_matches.json, and say so where the runs did not keep it."""
    from test_ap_matches import random_case

    from mabn.detection.coco_eval import match_records
    from mabn.lab.ap_matches import ApMatches

    runs, aps = tmp_path / "runs", {}
    for seed in (0, 1):
        for name, quality in (("table3_bn", 0.5), ("table3_mabn", 0.9), ("table3_syncbn", 0.88)):
            gt, dets = random_case(10 + seed, quality=quality)
            record = match_records(gt, dets, [i["id"] for i in gt.dataset["images"]])
            aps[name, seed] = ApMatches(record).ap()["AP"]
            make_det_run(runs, name, seed, aps[name, seed], aps[name, seed] - 1)
            (runs / name / f"seed{seed}" / "val_box_matches.json").write_text(json.dumps(record))
            if name != "table3_syncbn":  # mask matches (here another draw) for BN and MABN only
                gt, dets = random_case(20 + seed, quality=quality)
                record = match_records(gt, dets, [i["id"] for i in gt.dataset["images"]])
                aps["mask", name, seed] = ApMatches(record).ap()["AP"]
                (runs / name / f"seed{seed}" / "val_mask_matches.json").write_text(json.dumps(record))
    out = tmp_path / "t3.md"
    assert collect_results.main(["det_table3", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| 5.2: MABN(2) clearly outperforms BN(2), box AP"))
    gap = sum(aps["table3_mabn", s] - aps["table3_bn", s] for s in (0, 1)) / 2
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[7] == f"{gap:+.2f}" and cells[9] == "2", line
    assert cells[10] in ("agrees", "cannot tell (same sign, interval includes 0)"), line
    mask = next(ln for ln in text.splitlines() if ln.startswith("| 5.2: MABN(2) clearly outperforms BN(2), mask AP"))
    cells = [c.strip() for c in mask.strip("|").split("|")]
    gap = sum(aps["mask", "table3_mabn", s] - aps["mask", "table3_bn", s] for s in (0, 1)) / 2
    assert cells[7] == f"{gap:+.2f}" and cells[9] == "2", mask
    mask = next(ln for ln in text.splitlines() if ln.startswith("| 5.2: MABN(2) is comparable with SyncBN, mask AP"))
    assert mask.endswith("| - | - | 0 | no mask AP matches |"), mask
    assert "val_box_matches.json" in text
