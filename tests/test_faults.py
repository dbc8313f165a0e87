"""Failure behaviour of the trainer: no run loses work, lies about its state, or runs code it was
handed. One test (or more) per case of scripts/fault_drill.py, numbered as there."""

import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from mabn.engine import checkpoint, files, run, trainer
from mabn.engine.config import ConfigError

from _train_utils import (PYTHON, REPO, load_cfg, make_image_folder, metrics, read_log, run_script, snapshot,
                          tiny, train_in_process)


def _truncate(path, size=1000):
    with open(path, "r+b") as f:
        f.truncate(size)


def _ckpt_names(out):
    return [os.path.basename(f) for f in checkpoint.list_checkpoints(str(out / "checkpoints"))]


# 1. Every checkpoint corrupt: refused, nothing written; pruning by write order, rejected files set aside.

def test_resume_with_every_checkpoint_corrupt_is_refused(tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny(out, iterations=4, **{"schedule.ckpt_every": 2}))
    for f in checkpoint.list_checkpoints(str(out / "checkpoints")):
        _truncate(f)
    before = snapshot(out, exclude={".lock"})
    with pytest.raises(ConfigError) as e:
        train_in_process(tiny(out, iterations=4, resume="auto", **{"schedule.ckpt_every": 1, "keep_checkpoints": 1}))
    assert "ckpt_0000004.pt" in str(e.value) and "ckpt_0000002.pt" in str(e.value)
    assert "start over" in str(e.value)
    assert snapshot(out, exclude={".lock"}) == before  # the record and the files are untouched


def test_pruning_never_drops_the_new_checkpoint_for_rejected_ones(tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny(out, iterations=6, **{"schedule.ckpt_every": 2, "keep_checkpoints": 3}))
    for name in ("ckpt_0000004.pt", "ckpt_0000006.pt"):
        _truncate(out / "checkpoints" / name)
    r = train_in_process(tiny(out, iterations=6, resume="auto", stop_after=3, keep_checkpoints=1))
    assert r["status"] == "interrupted" and r["iteration"] == 3
    assert _ckpt_names(out) == ["ckpt_0000003.pt"]  # the newest written is kept, not the corrupt 6
    assert checkpoint.load(str(out / "checkpoints" / "ckpt_0000003.pt"))["iteration"] == 3
    for name in ("ckpt_0000004.pt", "ckpt_0000006.pt"):  # set aside for inspection, not counted
        assert (out / "checkpoints" / f"{name}.rejected").exists()


def test_keep_last_k_follows_write_order(tmp_path):
    d = str(tmp_path)
    state = {"model": {"w": torch.zeros(2)}, "config": {}}
    checkpoint.save({**state, "iteration": 20}, d, keep=1)
    old = time.time() - 100
    os.utime(os.path.join(d, "ckpt_0000020.pt"), (old, old))  # written earlier than what follows
    checkpoint.save({**state, "iteration": 5}, d, keep=1)  # e.g. a resume from an older checkpoint
    assert [os.path.basename(f) for f in checkpoint.list_checkpoints(d)] == ["ckpt_0000005.pt"]


# 2. A crash leaves status "failed" with the iteration reached and the error.

def test_crash_is_recorded_as_failed(tmp_path, monkeypatch):
    out = tmp_path / "crash"
    lr_at = trainer.lr_at

    def crash_at_2(cfg, it, base):  # an ordinary bug in iteration 2
        if it == 2:
            raise IndexError("list index out of range\nsecond line")
        return lr_at(cfg, it, base)

    monkeypatch.setattr(trainer, "lr_at", crash_at_2)
    with pytest.raises(IndexError):
        train_in_process(tiny(out, iterations=6))
    m = metrics(out)
    assert m["status"] == "failed" and m["iteration"] == 2
    assert m["error"] == "IndexError: list index out of range"


def test_injected_failure(tmp_path):
    """With worker processes too: they ignore SIGTERM, so a loader left alive by the failure would
    keep the process from ever exiting (multiprocessing's exit hook joins them)."""
    r = run_script([PYTHON, "train_imagenet.py", *tiny(tmp_path / "f", iterations=6,
                                                       **{"debug.fail_at": 3, "data.workers": 2})])
    assert r.returncode == 1 and "injected failure" in r.stderr
    m = metrics(tmp_path / "f")
    assert m["status"] == "failed" and m["iteration"] == 3 and m["error"] == "RuntimeError: debug.fail_at=3: injected failure"


def test_a_failed_run_leaves_no_worker_processes(tmp_path):
    """The training stream is closed on the way out of a failed step: its workers are gone when
    train() raises (a notebook or a test calling train() again does not accumulate them)."""
    with pytest.raises(RuntimeError, match="injected failure"):
        train_in_process(tiny(tmp_path / "f", iterations=6, **{"debug.fail_at": 3, "data.workers": 2}))
    assert [p for p in multiprocessing.active_children() if p.is_alive()] == []


# 3. Ctrl-C: a checkpoint at the next iteration boundary, status interrupted; a second one exits at once.

def test_sigint_checkpoints_like_sigterm(tmp_path):
    out = tmp_path / "ctrlc"
    proc = subprocess.Popen([PYTHON, "train_imagenet.py", *tiny(out, iterations=100000)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "train_log.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "stop signal (SIGINT) received" in output
    m = metrics(out)
    assert m["status"] == "interrupted" and m["iteration"] >= 1
    assert checkpoint.load(checkpoint.list_checkpoints(str(out / "checkpoints"))[0])["iteration"] == m["iteration"]


def test_second_sigint_raises_at_once():
    stop = trainer._StopFlag()
    try:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        except KeyboardInterrupt:
            pytest.fail("the first SIGINT raised KeyboardInterrupt instead of asking for a checkpoint")
        assert stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.restore()


# 4. Every logged number of a resumed run equals the uninterrupted run's.

def _scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return [(e.step, e.value) for e in EventAccumulator(str(out / "tb")).Reload().Scalars(tag)]


def test_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path):
    a, b = tmp_path / "straight", tmp_path / "split"
    common = {"schedule.iterations": 6, "schedule.log_every": 4}
    train_in_process(tiny(a, **common))
    assert train_in_process(tiny(b, stop_after=3, **common))["status"] == "interrupted"
    train_in_process(tiny(b, resume="auto", **common))
    keys = ("iteration", "loss", "top1_err", "top5_err", "lr")
    la, lb = read_log(a), read_log(b)
    assert [x["iteration"] for x in la] == [4, 6]
    assert [{k: x[k] for k in keys} for x in la] == [{k: x[k] for k in keys} for x in lb]
    assert metrics(a)["train_loss"] == metrics(b)["train_loss"]
    for tag in ("train/loss", "train/top1_err", "train/top5_err", "train/lr"):
        assert _scalars(a, tag) == _scalars(b, tag), tag


# 5. A checkpoint without its digest loads only with a warning.

def test_checkpoint_without_digest_warns(tmp_path, caplog):
    d = str(tmp_path)
    path = checkpoint.save({"iteration": 1, "model": {"w": torch.ones(3)}, "config": {}}, d, keep=1)
    os.remove(path + ".sha256")
    with caplog.at_level(logging.WARNING):
        assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert "has no digest file" in caplog.text and "integrity cannot be checked" in caplog.text


# 6. A resume whose config does not fit the checkpoint stops before anything is written.

@pytest.mark.parametrize("change, key", [
    ({"model": "resnet50_small"}, "model.arch"),
    ({"norm.buffer_size": 8}, "norm.buffer_size"),
    ({"data.train_size": 64}, "data.train_size"),
    ({"schedule.iterations": 1}, "schedule.iterations=1"),
])
def test_resume_with_a_config_that_does_not_fit_is_refused(tmp_path_factory, change, key):
    out = tmp_path_factory.getbasetemp() / "fit"  # one source run for all cases
    if not (out / "checkpoints").exists():
        train_in_process(tiny(out, iterations=4, stop_after=2))
    before = snapshot(out, exclude={".lock"})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train_in_process(tiny(out, iterations=4, resume="auto", **change))
    assert snapshot(out, exclude={".lock"}) == before


# 7. Bad input: one line naming the key, exit 2, nothing written.

def test_config_level_bad_inputs(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for overrides, key in ([(f"out_dir={afile}",), "out_dir"],
                           [("norm=gn", "norm.num_groups=7"), "norm.num_groups=7"]):
        with pytest.raises(ConfigError, match=key):
            load_cfg(list(overrides))
    if not torch.cuda.is_available():  # checked where the run starts (a config may be composed elsewhere)
        load_cfg(["device=cuda"])
        with pytest.raises(ConfigError, match="device=cuda but no CUDA GPU"):
            train_in_process(tiny(tmp_path / "cuda", device="cuda"))
        assert not (tmp_path / "cuda").exists()


def _folder(root, train, val, per_class=4):
    """A tiny ImageFolder whose splits hold the named classes; a name ending in "/" is an empty
    class folder."""
    make_image_folder(root, classes=4, train_per_class=per_class, val_per_class=2, size=8)
    for split, keep in (("train", train), ("val", val)):
        for c in os.listdir(root / split):
            if c not in keep:
                for f in os.listdir(root / split / c):
                    os.remove(root / split / c / f)
                if c + "/" not in keep:
                    os.rmdir(root / split / c)
    return str(root)


def test_run_level_bad_inputs_write_nothing(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"no checkpoint")
    cases = {
        "resume=": tiny(tmp_path / "a", resume=str(garbage)),
        "class2": tiny(tmp_path / "b", data="imagefolder",  # class2 is an empty folder
                       **{"data.root": _folder(tmp_path / "d1", ["class0", "class1", "class2/"], ["class0", "class1", "class2"])}),
        "differ": tiny(tmp_path / "c", data="imagefolder",
                       **{"data.root": _folder(tmp_path / "d2", ["class0", "class1"], ["class0", "class1", "class3"])}),
        "data.batch_size=8": tiny(tmp_path / "e", data="imagefolder",
                                  **{"data.root": _folder(tmp_path / "d3", ["class0", "class1"], ["class0", "class1"], 2)}),
        "model.num_classes=2": tiny(tmp_path / "f", **{"model.num_classes": 2}),
        "stats.layers": tiny(tmp_path / "g", **{"stats.enabled": "true", "stats.layers": "[layer9.bn]"}),
    }
    for key, overrides in cases.items():
        out = next(o for o in overrides if o.startswith("out_dir=")).split("=", 1)[1]
        with pytest.raises(ConfigError, match=key):
            train_in_process(overrides)
        assert not os.path.exists(out), key
    # The command line: exit 2, one line, nothing written.
    r = run_script([PYTHON, "train_imagenet.py", *cases["stats.layers"]])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "stats.layers" in r.stderr, r.stderr[-3000:]
    assert not os.path.exists(tmp_path / "g")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_on_cuda_without_gpu_is_one_line(tmp_path):
    out = tmp_path / "run"
    train_in_process(tiny(out, iterations=1))
    r = run_script([PYTHON, "eval.py", f"ckpt={out}", "device=cuda"])
    assert r.returncode == 2 and "device=cuda" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


# 8. Two runs, one out_dir: the second stops at once in its own words (exit 3), naming the holder.

def test_second_run_on_a_locked_out_dir_is_refused(tmp_path):
    out = tmp_path / "locked"
    holder = subprocess.Popen([PYTHON, "-c", "import sys, time; from mabn.engine import run; "
                               f"f = run.lock_out_dir({str(out)!r}); print('locked', flush=True); time.sleep(900)"],
                              cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run.OutDirInUse, match=f"in use by another run \\(pid {holder.pid} on "):
            train_in_process(tiny(out, iterations=2))
        assert not (out / "metrics.json").exists() and not (out / "config.yaml").exists()
        # Its own words and exit status: not "invalid configuration", not 2.
        r = run_script([PYTHON, "train_imagenet.py", *tiny(out, iterations=2)])
        assert r.returncode == 3, r.stderr[-3000:]
        assert r.stderr.strip() == (f"error: out_dir={out} is in use by another run (pid {holder.pid} on "
                                    f"{socket.gethostname()}); wait for it to end or choose another out_dir")
        assert not (out / "metrics.json").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train_in_process(tiny(out, iterations=1))["status"] == "finished"  # released with its holder


# 9. Disk full while writing a checkpoint.

def test_full_disk_during_a_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "full"
    writes = []
    real = files.write_bytes

    def write(path, data):
        writes.append(path)
        if "ckpt_0000004" in path:  # the second checkpoint: half written, then ENOSPC
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, data)

    monkeypatch.setattr(files, "write_bytes", write)
    first = {}

    def remember_first(*a, **k):  # the files of the first checkpoint, as written
        path = save(*a, **k)
        first.update({f: open(f, "rb").read() for f in (path, path + ".sha256")})
        return path

    save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", remember_first)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        train_in_process(tiny(out, iterations=6, **{"schedule.ckpt_every": 2}))
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt_0000002.pt", "ckpt_0000002.pt.sha256"]
    for f, content in first.items():
        assert open(f, "rb").read() == content
    m = metrics(out)
    assert m["status"] == "failed" and m["iteration"] == 4 and "No space left on device" in m["error"]


def test_leftover_temporaries_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "tmp"
    train_in_process(tiny(out, iterations=2, stop_after=1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = out / "checkpoints" / f"ckpt_0000002.pt.tmp.{dead.pid}"
    leftover.write_bytes(b"half a checkpoint")
    alive = out / "checkpoints" / f"ckpt_0000002.pt.tmp.{os.getppid()}"  # a live process: kept
    alive.write_bytes(b"being written")
    assert train_in_process(tiny(out, iterations=2, resume="auto"))["status"] == "finished"
    assert not leftover.exists() and alive.exists()


# 10. Small ones.

def test_repeated_milestones_and_fp16_on_cpu_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"schedule\.milestones=\[10, 10\] must be increasing"):
        load_cfg(["schedule.iterations=30", "schedule.milestones=[10,10]"])
    with pytest.raises(ConfigError, match="amp=fp16 needs a CUDA GPU"):
        train_in_process(tiny(tmp_path / "fp16", amp="fp16"))
    assert not (tmp_path / "fp16").exists()


# 12. Checkpoints load as data only.

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "ckpt_0000001.pt"
    buf = io.BytesIO()
    torch.save({"iteration": 1, "model": {}, "config": {}, "x": _Payload(marker)}, buf)
    path.write_bytes(buf.getvalue())
    (tmp_path / "ckpt_0000001.pt.sha256").write_text(hashlib.sha256(buf.getvalue()).hexdigest() + "\n")
    with pytest.raises(checkpoint.CheckpointError, match="refused: it asks for the Python object"):
        checkpoint.load(str(path))
    r = run_script([PYTHON, "eval.py", f"ckpt={path}"])
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not marker.exists()


def test_checkpoint_of_the_old_format_gets_a_clear_message(tmp_path):
    import random

    import numpy as np
    path = tmp_path / "ckpt_0000001.pt"
    torch.save({"iteration": 1, "model": {}, "config": {},
                "rng": {"python": random.getstate(), "numpy": np.random.get_state()}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="before checkpoints were data only"):
        checkpoint.load(str(path))


def test_rng_states_round_trip_as_data(tmp_path):
    import random

    import numpy as np
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # a cached Gaussian in both
    path = checkpoint.save({"iteration": 1, "model": {}, "config": {}, "rng": trainer._rng_state()}, str(tmp_path), 1)
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    trainer._set_rng_state(checkpoint.load(path)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


# "finished": resume=auto on a finished record whose checkpoints did not survive.

def test_resume_auto_on_a_finished_record_without_checkpoints_does_nothing(tmp_path, caplog):
    out = tmp_path / "done"
    train_in_process(tiny(out, iterations=2))
    for f in os.listdir(out / "checkpoints"):
        os.remove(out / "checkpoints" / f)
    before = snapshot(out)
    with caplog.at_level(logging.INFO):
        m = train_in_process(tiny(out, iterations=2, resume="auto"))
    assert m["status"] == "finished" and m["iteration"] == 2
    assert "already finished" in caplog.text
    assert snapshot(out) == before  # nothing written, not even log.txt or the lock
    r = run_script([PYTHON, "train_imagenet.py", *tiny(out, iterations=2, resume="auto")])
    assert r.returncode == 0 and "already finished" in r.stdout, r.stderr[-3000:]
    assert snapshot(out) == before
    # Corrupt checkpoints only: item 1's rule (refused), still nothing written.
    (out / "checkpoints" / "ckpt_0000002.pt").write_bytes(b"garbage")
    before = snapshot(out)
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        train_in_process(tiny(out, iterations=2, resume="auto"))
    assert snapshot(out, exclude={".lock"}) == {k: v for k, v in before.items() if k != ".lock"}


# 13. A resume is the run it claims to be: another experiment in the same out_dir is refused.

def _source_runs(base):
    """One finished and one interrupted (stop_after=2) 4-iteration run, made once per session."""
    done, part = base / "done", base / "part"
    if not (done / "checkpoints").exists():
        train_in_process(tiny(done, iterations=4))
        train_in_process(tiny(part, iterations=4, stop_after=2))
    return {"finished": done, "mid-run": part}


@pytest.mark.parametrize("which", ["finished", "mid-run"])
@pytest.mark.parametrize("change, shown", [
    ({"seed": 1}, "seed=1 (the checkpoint's: 0)"),
    ({"norm": "bn_small"}, "norm.form='vanilla' (the checkpoint's: 'modified')"),
    ({"optim.lr": 0.05}, "optim.lr=0.05 (the checkpoint's: 0.02)"),
    ({"data.decoder": "pil"}, "data.decoder='pil' (the checkpoint's: 'tensor')"),
])
def test_resume_into_another_experiment_is_refused(tmp_path_factory, which, change, shown):
    out = _source_runs(tmp_path_factory.getbasetemp() / "sources")[which]
    before = snapshot(out, exclude={".lock"})
    with pytest.raises(ConfigError, match=r"does not fit this config: .*" + re.escape(shown)):
        train_in_process(tiny(out, iterations=4, resume="auto", **change))
    assert snapshot(out, exclude={".lock"}) == before


def test_resume_refusal_is_one_line_listing_every_key(tmp_path_factory):
    out = _source_runs(tmp_path_factory.getbasetemp() / "sources")["mid-run"]
    r = run_script([PYTHON, "train_imagenet.py", *tiny(out, iterations=4, resume="auto", seed=3,
                                                       **{"norm.alpha": 0.5})])
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert r.stderr.count("Traceback") == 0 and line.startswith("invalid configuration: resume: the checkpoint ")
    assert "norm.alpha=0.5 (the checkpoint's: 0.98)" in line and "seed=3 (the checkpoint's: 0)" in line


def test_finished_record_without_checkpoints_of_another_experiment_is_refused(tmp_path):
    out = tmp_path / "done"
    train_in_process(tiny(out, iterations=2))
    for f in os.listdir(out / "checkpoints"):
        os.remove(out / "checkpoints" / f)
    before = snapshot(out)
    with pytest.raises(ConfigError, match=re.escape("seed=1 (the checkpoint's: 0)")):
        train_in_process(tiny(out, iterations=2, resume="auto", seed=1))
    assert snapshot(out) == before


def test_keys_free_to_differ_change_nothing(tmp_path):
    """A resume that changes only keys of RESUME_FREE_KEYS (cadences, workers, the eval batch,
    statistics recording, the name, ...) ends with the uninterrupted run's weights and buffers,
    bit for bit: those keys are free because they cannot change the result."""
    from mabn.engine.config import RESUME_FREE_KEYS
    a, b = tmp_path / "straight", tmp_path / "split"
    train_in_process(tiny(a, iterations=6))
    train_in_process(tiny(b, iterations=6, stop_after=3))
    free = {"data.workers": 1, "schedule.log_every": 2, "schedule.eval_every": 2, "schedule.ckpt_every": 1,
            "keep_checkpoints": 1, "data.eval_batch_size": 5, "name": "renamed", "stats.enabled": "true",
            "debug.fail_at": 9, "data.pin_memory": "false"}
    assert all(any(k == f or (f.endswith(".") and k.startswith(f)) for f, _ in RESUME_FREE_KEYS) for k in free)
    assert train_in_process(tiny(b, iterations=6, resume="auto", **free))["status"] == "finished"
    sa, sb = (checkpoint.load(checkpoint.list_checkpoints(str(o / "checkpoints"))[0]) for o in (a, b))
    assert sa["iteration"] == sb["iteration"] == 6
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, v in sa["ranks"][0]["buffers"].items():
        assert torch.equal(v, sb["ranks"][0]["buffers"][k]), k


def test_schedule_may_grow_only_where_the_lr_of_the_done_iterations_stays(tmp_path):
    step, cosine = tmp_path / "step", tmp_path / "cosine"
    train_in_process(tiny(step, iterations=2))
    assert train_in_process(tiny(step, iterations=3, resume="auto"))["iteration"] == 3
    train_in_process(tiny(cosine, iterations=2, **{"schedule.policy": "cosine"}))
    with pytest.raises(ConfigError, match=r"schedule\.iterations=3 \(the checkpoint's: 2\): with schedule\.policy=cosine"):
        train_in_process(tiny(cosine, iterations=3, resume="auto", **{"schedule.policy": "cosine"}))


def test_multirun_over_seeds_into_one_out_dir_stops_at_the_second(tmp_path):
    """-m seed=0,1 out_dir=X resume=auto: seed 0 trains, seed 1 is refused (exit 2) instead of
    being reported as done."""
    out = tmp_path / "multi"
    r = run_script([PYTHON, "train_imagenet.py", "-m", *tiny(out, iterations=2, resume="auto", seed="0,1"),
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert r.returncode == 2 and "seed=1 (the checkpoint's: 0)" in r.stderr, r.stderr[-3000:]
    assert "already finished" not in r.stdout
    assert metrics(out)["status"] == "finished" and "seed: 0\n" in (out / "config.yaml").read_text()


# 15. A full disk once out_dir is locked, before the first checkpoint: status failed, no temporaries.

def _enospc_for(part, monkeypatch):
    real = files.write_bytes

    def write(path, data):
        if part in path:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(files, "write_bytes", write)


def _temporaries(folder):
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if ".tmp." in f]


@pytest.mark.parametrize("part", ["env.json", "config.yaml", "metrics.json"])
def test_full_disk_before_the_first_checkpoint_is_recorded(tmp_path, monkeypatch, part):
    out = tmp_path / "run"
    _enospc_for(part, monkeypatch)
    with pytest.raises(OSError, match=f"No space left on device \\(writing .*{re.escape(part)}\\)"):
        train_in_process(tiny(out, iterations=2))
    assert not _temporaries(out), _temporaries(out)
    if part != "metrics.json":  # the disk still takes metrics.json: the failure is recorded
        m = metrics(out)
        assert m["status"] == "failed" and m["iteration"] == 0 and part in m["error"], m
    else:
        assert not (out / "metrics.json").exists()


def _fault_drill():
    import importlib.util
    spec = importlib.util.spec_from_file_location("fault_drill", os.path.join(REPO, "scripts", "fault_drill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fault", ["enospc:env.json", "full"])
def test_full_disk_on_the_command_line_is_one_line(tmp_path, fault):
    """The command line: one line on stderr (no Hydra traceback), exit 1, no temporary file; with
    a disk that takes no byte at all (log.txt included), nothing but the lock and an empty log."""
    drill = _fault_drill()
    out = tmp_path / "run"
    r = run_script([PYTHON, "-c", drill._FAULTY_DISK, *tiny(out, iterations=2)], env={"DISK_FAULT": fault})
    assert r.returncode == 1, r.stderr[-3000:]
    err = drill.ours(r)
    assert err.count("\n") == 0 and err.startswith("error: OSError: [Errno ") and "Traceback" not in r.stderr, err
    assert not _temporaries(out), _temporaries(out)
    if fault == "full":
        assert sorted(os.listdir(out)) == [".lock", "log.txt"] and (out / "log.txt").stat().st_size == 0
    else:
        assert metrics(out)["status"] == "failed"


def test_every_atomic_write_removes_its_temporary_on_failure(tmp_path, monkeypatch):
    _enospc_for("b.txt", monkeypatch)
    target = {str(tmp_path / "a.txt"): "a", str(tmp_path / "b.txt"): b"b" * 100}
    with pytest.raises(OSError, match="b.txt"):
        files.atomic_write(target)
    assert os.listdir(tmp_path) == []  # neither file, no temporary
    (tmp_path / "m.json").write_text("{}")
    _enospc_for("m.json", monkeypatch)
    with pytest.raises(OSError):
        run.write_json(str(tmp_path / "m.json"), {"x": 1})
    assert sorted(os.listdir(tmp_path)) == ["m.json"] and (tmp_path / "m.json").read_text() == "{}"
