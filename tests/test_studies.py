"""The study multiruns expand to exactly the paper's table rows; the collector builds the tables."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from mabn.engine import collect as collect_results

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
        cwd=REPO, capture_output=True, text=True, timeout=300)
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
        assert cfg["norm"]["layer"] == "mabn"
        if "sma" in (cfg["norm"]["fp_stats"], cfg["norm"]["bp_stats"]):
            assert cfg["norm"]["buffer_size"] == 16
        # The paper's setting (appendix B.2).
        assert (cfg["model"]["arch"], cfg["data"]["batch_size"], cfg["schedule"]["iterations"]) == ("resnet50", 32, 600000)
        assert cfg["out_dir"] == f"runs/{study}/{cfg['name']}/seed0"


def test_figure1b_and_scaled_down_protocol_expansion(tmp_path):
    jobs = dry_run(tmp_path, "+study=figure1b")
    got = sorted((c["name"], c["norm"]["norm_batch_size"]) for c in jobs)
    assert got == sorted((name, b) for name in ("table2_row3_bn_small", "table2_row4_brn", "table2_row8_mabn")
                         for b in (2, 4, 8, 16, 32))
    assert len({c["out_dir"] for c in jobs}) == 15
    # The scaled-down protocol keeps the rows' normalization and swaps model, data and schedule.
    jobs = dry_run(tmp_path, "+study=table2", "+protocol=tiny", "seed=0,1")
    assert len(jobs) == 16 and {c["seed"] for c in jobs} == {0, 1}
    for cfg in jobs:
        assert settings(cfg) == TABLE2[cfg["name"]]
        assert (cfg["model"]["arch"], cfg["model"]["small_input"], cfg["data"]["name"], cfg["data"]["image_size"]) == \
            ("resnet18", False, "imagefolder", 64)


def make_run(root, name, seed, status, err=None, nbs=2, diverged_at=None):
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    cfg = {"name": name, "seed": seed, "norm": {"norm_batch_size": nbs},
           "model": {"arch": "resnet18", "small_input": True},
           "data": {"name": "imagefolder", "root": "/data/tiny", "image_size": 32, "batch_size": 32},
           "schedule": {"iterations": 600}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {"status": status, "iteration": 600 if status == "finished" else (diverged_at or 10),
               "val_top1_err": err, "wall_time_s": 60.0}
    if diverged_at:
        metrics["diverged_at"] = diverged_at
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "env.json").write_text(json.dumps({"host": "box", "git_commit": "abcdef0123456", "git_dirty": False,
                                            "packages": {"torch": "2.x"}}))


def test_collector_on_fabricated_runs(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "table2_row1_bn_regular", 0, "finished", 40.0, nbs=32)
    make_run(runs, "table2_row1_bn_regular", 1, "finished", 42.0, nbs=32)
    make_run(runs, "table2_row2_modified_regular", 0, "finished", 41.5, nbs=32)
    make_run(runs, "table2_row3_bn_small", 0, "finished", 55.0)
    make_run(runs, "table2_row3_bn_small", 1, "finished", 57.0)
    make_run(runs, "table2_row4_brn", 0, "finished", 50.0)
    make_run(runs, "table2_row5_brn_sma", 0, "diverged", None, diverged_at=137)
    make_run(runs, "table2_row6_modified_small", 0, "finished", 48.0)
    make_run(runs, "table2_row7_modified_ema", 0, "interrupted", None)
    # table2_row8_mabn: missing
    out = tmp_path / "table2.md"
    args = ["table2", str(runs), "--out", str(out), "--title", "T2"]
    assert collect_results.main(args) == 0
    text = out.read_text()
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    # Row 1: mean 41.00, sample std 1.41, gap 0; paper 23.41.
    assert lines["1 BN, regular (b=32)"] == "| 1 BN, regular (b=32) | 41.00 ± 1.41 | +0.00 | 23.41 | +0.00 | 0,1 | 2 finished |"
    assert lines["3 BN"] == "| 3 BN | 56.00 ± 1.41 | +15.00 | 35.22 | +11.81 | 0,1 | 2 finished |"
    assert lines["4 vanilla + EMAS in FP (BRN)"].startswith("| 4 vanilla + EMAS in FP (BRN) | 50.00 | +9.00 | 30.29 | +6.88 | 0 |")
    assert lines["5 vanilla + EMAS in FP + SMAS in BP"] == \
        "| 5 vanilla + EMAS in FP + SMAS in BP | - | - | - | - | 0 | 1 diverged (iteration 137) |"
    assert "interrupted at iteration 10" in lines["7 modified + EMAS in FP"]
    assert lines["8 modified + EMAS in FP + SMAS in BP (MABN)"].startswith(
        "| 8 modified + EMAS in FP + SMAS in BP (MABN) | missing |")
    assert "Missing configurations (no run directory found): `table2_row8_mabn`." in text
    # Deterministic: the same runs give the same file.
    assert collect_results.main(args) == 0
    assert out.read_text() == text


def test_collector_figure1b_writes_a_plot(tmp_path):
    runs = tmp_path / "runs"
    for b in (2, 32):
        make_run(runs / f"b{b}", "table2_row8_mabn", 0, "finished", 40.0 + b / 10, nbs=b)
        make_run(runs / f"b{b}", "table2_row3_bn_small", 0, "finished", 60.0 - b, nbs=b)
    out = tmp_path / "figure1b.md"
    assert collect_results.main(["figure1b", str(runs), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| MABN, b=2 | 40.20 |" in text and "| BN, b=32 | 28.00 | +0.00 | 23.41 | +0.00 |" in text
    assert (tmp_path / "figure1b.png").read_bytes()[:4] == b"\x89PNG"
    assert "`table2_row4_brn` (norm_batch_size=2)" in text
