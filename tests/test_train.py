"""Training runs: quickstart smoke, torchrun/gloo, exact resume, pre-emption, corrupted
checkpoints, divergence."""

import glob
import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch

from mabn.engine import checkpoint

from _train_utils import PYTHON, REPO, metrics, read_log, run_script, tiny, train_in_process


def test_quickstart_smoke(tmp_path):
    """The README's quickstart (the default config, shortened): error far below chance (90%)."""
    out = tmp_path / "qs"
    r = run_script([PYTHON, "train_imagenet.py", f"out_dir={out}", "device=cpu", "schedule.iterations=100",
                    "schedule.milestones=[80]", "schedule.eval_every=0", "progress_bar=false"],
                   env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(out)
    assert m["status"] == "finished" and m["iteration"] == 100
    assert m["val_top1_err"] < 50, m
    assert glob.glob(str(out / "tb" / "events.out.tfevents.*"))
    for f in ("config.yaml", "env.json", "log.txt", "train_log.jsonl", "checkpoints/ckpt_0000100.pt"):
        assert (out / f).exists(), f
    env = json.loads((out / "env.json").read_text())  # the machine every figure must name
    assert env["cpu"] and env["cpu_capability"] and env["torch_threads"] == 2, env
    if os.path.exists("/proc/cpuinfo"):  # Linux: family and model number tell one "AMD EPYC" from another
        assert env["cpu_id"]["family"] and env["cpu_id"]["model"], env
    # the process's CPU time over the same span as the wall time: below the wall time for two
    # threads only if the machine was busy; never above twice it
    assert 0 < m["cpu_time_s"] <= 2 * m["wall_time_s"] + 1, m
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tags = EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"]
    for tag in ("train/loss", "train/top1_err", "train/top5_err", "train/lr", "perf/images_per_s",
                "perf/data_time_s", "val/top1_err", "val/top5_err"):
        assert tag in tags


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    r = run_script([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train_imagenet.py", *tiny(out, iterations=4)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert metrics(out)["status"] == "finished"
    ranks = checkpoint.load(str(out / "checkpoints" / "ckpt_0000004.pt"))["ranks"]
    assert len(ranks) == 2
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]  # DDP kept the weights identical
    # broadcast_buffers=False: each rank keeps the statistics of its own images.
    name = "layer1.0.bn1.running_var"
    assert not torch.equal(ranks[0]["buffers"][name], ranks[1]["buffers"][name])


def _final_state(out):
    state = checkpoint.load(checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))[0])
    return state["model"], state["ranks"][0]["buffers"]


def test_resume_is_exact(tmp_path):
    """8 iterations straight == 4, stop, resume, 4 more: same weights, buffers (incl. the SMA
    windows) and logged losses, bit for bit; also with worker processes in the resumed run."""
    a, b = tmp_path / "straight", tmp_path / "split"
    common = {"schedule.milestones": "[5]", "schedule.iterations": 8}
    train_in_process(tiny(a, **common))
    r1 = train_in_process(tiny(b, stop_after=4, **common))
    assert r1["status"] == "interrupted" and metrics(b)["iteration"] == 4
    before = checkpoint.load(str(b / "checkpoints" / "ckpt_0000004.pt"))["time"]
    r2 = train_in_process(tiny(b, resume="auto", **{"data.workers": 2}, **common))
    assert r2["status"] == "finished"
    _check_time_over_invocations(metrics(a), metrics(b), r1, before)
    (ma, ba), (mb, bb) = _final_state(a), _final_state(b)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
    assert "layer1.0.bn1.bp_window" in ba
    la, lb = read_log(a), read_log(b)
    assert [x["iteration"] for x in lb] == list(range(1, 9))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert [x["lr"] for x in lb] == pytest.approx([0.02] * 5 + [0.002] * 3)  # lr / 10 after iteration 5
    assert metrics(a)["val_top1_err"] == metrics(b)["val_top1_err"]


def _check_time_over_invocations(straight, split, first, before):
    """metrics.json's totals: one invocation's own time for a straight run; for a resumed one the
    time recorded in the checkpoint it resumed from plus the last invocation's."""
    assert straight["invocations"] == 1 and straight["first_started_at"] == straight["started_at"]
    assert straight["total_wall_time_s"] == pytest.approx(straight["wall_time_s"], abs=0.15)
    # the checkpoint of iteration 4 was written before the first invocation ended
    assert before["invocations"] == 1 and 0 < before["wall_s"] <= first["wall_time_s"] + 0.1
    assert split["invocations"] == 2 and split["first_started_at"] == first["started_at"]
    assert split["total_wall_time_s"] == pytest.approx(before["wall_s"] + split["wall_time_s"], abs=0.15)
    assert split["total_cpu_time_s"] == pytest.approx(before["cpu_s"] + split["cpu_time_s"], abs=0.15)
    assert split["total_wall_time_s"] > split["wall_time_s"]


def test_resume_from_a_checkpoint_without_time_records_no_totals(tmp_path):
    """A checkpoint written before checkpoints recorded time: the run's totals are unknown, so
    metrics.json leaves them out rather than report the last invocation as the whole run."""
    out = tmp_path / "run"
    train_in_process(tiny(out, iterations=4, stop_after=2))
    path = str(out / "checkpoints" / "ckpt_0000002.pt")
    state = checkpoint.load(path)
    del state["time"]
    os.remove(path)
    checkpoint.save(state, str(out / "checkpoints"), keep=1)
    assert train_in_process(tiny(out, iterations=4, resume="auto"))["status"] == "finished"
    m = metrics(out)
    assert m["wall_time_s"] > 0
    assert not {"total_wall_time_s", "total_cpu_time_s", "invocations", "first_started_at"} & m.keys()


def test_sigterm_writes_a_checkpoint(tmp_path):
    out = tmp_path / "pre"
    proc = subprocess.Popen([PYTHON, "train_imagenet.py", *tiny(out, iterations=100000)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600  # a wide margin for a loaded machine
    while time.time() < deadline and not (out / "train_log.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    m = metrics(out)
    assert m["status"] == "interrupted" and m["iteration"] >= 1
    files = checkpoint.list_checkpoints(str(out / "checkpoints"))
    assert len(files) == 1
    state = checkpoint.load(files[0])
    assert state["iteration"] == m["iteration"] and state["status"] == "interrupted"
    assert "stop signal (SIGTERM) received" in output


def test_corrupted_checkpoint_falls_back(tmp_path, caplog):
    out = tmp_path / "c"
    train_in_process(tiny(out, iterations=6, **{"schedule.ckpt_every": 2, "keep_checkpoints": 2}))
    files = checkpoint.list_checkpoints(str(out / "checkpoints"))
    assert [os.path.basename(f) for f in files] == ["ckpt_0000006.pt", "ckpt_0000004.pt"]  # keep last 2
    with open(files[0], "r+b") as f:  # flip bytes in the middle of the newest file
        f.seek(os.path.getsize(files[0]) // 2)
        f.write(b"\x00garbage\x00" * 8)
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(files[0])
    os.remove(files[0] + ".sha256")  # without its digest, a truncated file is still rejected
    with open(files[0], "r+b") as f:
        f.truncate(1000)
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(files[0])
    with caplog.at_level(logging.ERROR):
        state, path = checkpoint.load_latest(str(out / "checkpoints"))
    assert path == files[1] and state["iteration"] == 4
    assert "ckpt_0000006.pt is corrupted" in caplog.text and "falling back" in caplog.text
    # resume=auto continues from iteration 4 and finishes.
    r = train_in_process(tiny(out, iterations=6, resume="auto"))
    assert r["status"] == "finished" and [x["iteration"] for x in read_log(out)] == list(range(1, 7))


def test_non_finite_loss_stops_as_diverged(tmp_path):
    out = tmp_path / "nan"
    r = run_script([PYTHON, "train_imagenet.py", *tiny(out, iterations=50, **{"debug.nan_loss_at": 3})])
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(out)
    assert m["status"] == "diverged" and m["diverged_at"] == 3 and m["iteration"] == 3
    assert m["val_top1_err"] is None
    assert [x["iteration"] for x in read_log(out)] == [1, 2]


def test_fresh_start_refuses_to_overwrite_checkpoints(tmp_path):
    from mabn.engine.config import ConfigError
    out = tmp_path / "x"
    train_in_process(tiny(out, iterations=2))
    with pytest.raises(ConfigError, match="resume=auto"):
        train_in_process(tiny(out, iterations=2))


def test_channels_last_and_bf16_autocast(tmp_path):
    out = tmp_path / "amp"
    r = train_in_process(tiny(out, iterations=3, amp="bf16", channels_last="true"))
    assert r["status"] == "finished" and all(x["loss"] < 100 for x in read_log(out))


def test_the_final_validation_keeps_every_images_prediction(tmp_path):
    """val_predictions.csv: one line per validation image (index, target, top-1 class), whose
    errors give metrics.json's top-1 error exactly."""
    from mabn.engine.classification import read_predictions
    out = tmp_path / "run"
    m = train_in_process(tiny(out, iterations=2, **{"data.val_size": 25}))
    preds = read_predictions(out / "val_predictions.csv")
    assert sorted(preds) == list(range(25))
    wrong = sum(t != p for t, p in preds.values())
    assert m["val_top1_err"] == pytest.approx(100.0 * wrong / 25)


def test_provenance_names_uncommitted_changes(tmp_path, monkeypatch):
    """env.json says which files made a run's checkout dirty, not only that it was."""
    from omegaconf import OmegaConf
    from mabn.engine import run

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    (repo / "tracked.py").write_text("a = 1\n")
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "tracked.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "first"], check=True)
    monkeypatch.setattr(run, "_REPO", str(repo))
    cfg = OmegaConf.create({"seed": 0})

    run.write_provenance(cfg, str(tmp_path / "clean"), world_size=1)
    env = json.loads((tmp_path / "clean" / "env.json").read_text())
    assert env["git_dirty"] is False and env["git_changes"] == [], env
    assert len(env["git_commit"]) == 40

    (repo / "tracked.py").write_text("a = 2\n")
    (repo / "notes.txt").write_text("x\n")
    run.write_provenance(cfg, str(tmp_path / "dirty"), world_size=1)
    env = json.loads((tmp_path / "dirty" / "env.json").read_text())
    assert env["git_dirty"] is True
    assert env["git_changes"] == [" M tracked.py", "?? notes.txt"], env["git_changes"]

    for i in range(run._MAX_CHANGES + 5):
        (repo / f"new{i:03d}.txt").write_text("x\n")
    run.write_provenance(cfg, str(tmp_path / "many"), world_size=1)
    changes = json.loads((tmp_path / "many" / "env.json").read_text())["git_changes"]
    assert len(changes) == run._MAX_CHANGES + 1 and changes[-1] == "... and 7 more", changes[-3:]
