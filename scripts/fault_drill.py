"""Fault drill of the trainer: every failure case on short synthetic CPU runs, one line per case,
PASS or FAIL; exit status 1 if any case fails.

    python scripts/fault_drill.py                 # every case (several minutes on 2 busy cores)
    python scripts/fault_drill.py --quick         # the cheap cases (QUICK; .ci/run runs these)
    python scripts/fault_drill.py 1 7 12          # only these cases
    python scripts/fault_drill.py --keep /tmp/d   # keep the run folders there

Each case runs ``train_imagenet.py`` (or ``eval.py``, ``torchrun``, ``scripts/train_detection.py``) as a user would and checks
what README.md's "Failure behaviour" promises: the exit status, the message, metrics.json, the
checkpoints, and that a refused run wrote nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image

from mabn.engine import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # mabn comes from the installed repository
TIMEOUT = 900  # per command: a wide margin for a loaded machine

# A run of seconds: small-input ResNet-18, 16 px synthetic images, MABN in groups of 2, CPU.
BASE = ["model=resnet18_small", "data=synthetic", "device=cpu", "data.batch_size=8", "norm.norm_batch_size=2",
        "norm.buffer_size=4", "data.image_size=16", "data.train_size=48", "data.val_size=16", "data.workers=0",
        "schedule.milestones=[]", "schedule.eval_every=0", "schedule.log_every=1", "progress_bar=false",
        "optim.lr=0.02"]


class Failed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


def overrides(*args) -> list[str]:
    """BASE with ``args`` applied: a key (or group) given in ``args`` replaces BASE's."""
    keys = {a.split("=", 1)[0] for a in args}
    return [a for a in BASE if a.split("=", 1)[0] not in keys] + list(args)


def train(out, *args, iterations=6, ckpt_every=100, runner=("train_imagenet.py",), env=None):
    return cmd([*runner, *overrides(f"out_dir={out}", f"schedule.iterations={iterations}",
                                    f"schedule.ckpt_every={ckpt_every}", *args)], env)


def cmd(args, env=None):
    return subprocess.run([PY, *args], cwd=REPO, env=dict(ENV, **(env or {})), capture_output=True, text=True,
                          timeout=TIMEOUT)


def metrics(out) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def ckpts(out) -> list[str]:
    return [os.path.basename(f) for f in checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))]


#: A line of torch's own C++ logging (e.g. its extension builder's warnings): not the trainer's.
_TORCH_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def ours(r) -> str:
    """What the command wrote on stderr, without torch's own log lines."""
    return "\n".join(ln for ln in r.stderr.strip().splitlines() if not _TORCH_LOG.match(ln))


def one_line(r) -> str:
    """The one line a failed command wrote on stderr (Failed if it wrote more, or a traceback)."""
    err = ours(r)
    check(err.count("\n") == 0 and "Traceback" not in err, f"not one line on stderr: {err[-300:]}")
    return err


def temporaries(folder) -> list[str]:
    """Every ``*.tmp.*`` file under ``folder``."""
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if ".tmp." in f]


def snapshot(folder, exclude=(".lock",)) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), folder)
            if rel not in exclude:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def refused(r, key, out=None, before=None, status=2) -> None:
    """Exit ``status`` (2), one line naming ``key``, no traceback; out_dir absent or unchanged."""
    check(r.returncode == status, f"exit {r.returncode}, wanted {status}: {r.stderr.strip()[-300:]}")
    check(key in one_line(r), f"not one line naming {key!r}: {r.stderr.strip()[-300:]}")
    if out is not None:
        check(os.path.exists(out) == (before is not None), f"{out} was created")
        if before is not None:
            check(snapshot(out) == before, f"{out} changed")


def truncate(path, size=1000):
    with open(path, "r+b") as f:
        f.truncate(size)


def wait_for(path, proc, seconds=600):
    deadline = time.time() + seconds
    while time.time() < deadline and not os.path.exists(path) and proc.poll() is None:
        time.sleep(0.2)
    check(os.path.exists(path), f"{path} did not appear")


# ------------------------------------------------------------------------------------------------

def case_1(d):
    """every checkpoint corrupt: resume=auto refused (exit 2, files named), nothing written;
    with some corrupt, the new checkpoint is kept and the rejected ones are set aside"""
    src = os.path.join(d, "src")
    train(src, "stop_after=4", iterations=6, ckpt_every=2)
    for f in ckpts(src):
        truncate(os.path.join(src, "checkpoints", f))
    before = snapshot(src)
    r = train(src, "resume=auto", "keep_checkpoints=1", "stop_after=5", iterations=6, ckpt_every=1)
    refused(r, "ckpt_0000004.pt", src, before)
    check("ckpt_0000002.pt" in r.stderr and "start over" in r.stderr, "message lacks the files / the way out")
    part = os.path.join(d, "part")
    train(part, "keep_checkpoints=3", iterations=6, ckpt_every=2)
    for f in ("ckpt_0000004.pt", "ckpt_0000006.pt"):
        truncate(os.path.join(part, "checkpoints", f))
    r = train(part, "resume=auto", "keep_checkpoints=1", "stop_after=3", iterations=6, ckpt_every=2)
    check(r.returncode == 0, f"partial corruption: exit {r.returncode}")
    check(ckpts(part) == ["ckpt_0000003.pt"], f"kept {ckpts(part)}, wanted the new ckpt_0000003.pt")
    check(os.path.exists(os.path.join(part, "checkpoints", "ckpt_0000006.pt.rejected")), "rejected file not kept aside")


def case_2(d):
    """a crash (exception at iteration 3) with two data worker processes leaves status failed, the
    iteration and the error, and the process exits (the workers, which ignore SIGTERM, are shut down)"""
    out = os.path.join(d, "crash")
    r = train(out, "debug.fail_at=3", "data.workers=2")
    m = metrics(out)
    check(r.returncode == 1, f"exit {r.returncode}")
    check(m["status"] == "failed" and m["iteration"] == 3 and "injected failure" in m.get("error", ""), str(m))


def case_3(d):
    """Ctrl-C (SIGINT): checkpoint at the next iteration boundary, status interrupted, exit 0"""
    out = os.path.join(d, "ctrlc")
    proc = subprocess.Popen([PY, "train_imagenet.py", *BASE, f"out_dir={out}", "schedule.iterations=100000"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(os.path.join(out, "train_log.jsonl"), proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=TIMEOUT)
    m = metrics(out)
    check(proc.returncode == 0 and "Traceback" not in output, f"exit {proc.returncode}: {output[-300:]}")
    check(m["status"] == "interrupted" and ckpts(out) == [f"ckpt_{m['iteration']:07d}.pt"], str(m))


def case_4(d):
    """stop_after=3 + resume=auto logs the same numbers as an uninterrupted run (train_log, train_loss)"""
    a, b = os.path.join(d, "straight"), os.path.join(d, "split")
    train(a, "schedule.log_every=4")
    train(b, "schedule.log_every=4", "stop_after=3")
    train(b, "schedule.log_every=4", "resume=auto", "data.workers=2")

    def numbers(out):
        with open(os.path.join(out, "train_log.jsonl")) as f:
            rows = [json.loads(x) for x in f if x.strip()]
        return [[r[k] for k in ("iteration", "loss", "top1_err", "top5_err", "lr")] for r in rows], metrics(out)["train_loss"]

    check(numbers(a) == numbers(b), f"{numbers(a)} != {numbers(b)}")


def case_5(d):
    """a byte-flipped checkpoint without its .sha256 loads only with a warning"""
    out = os.path.join(d, "nodigest")
    train(out, "stop_after=2", ckpt_every=1)
    path = os.path.join(out, "checkpoints", "ckpt_0000002.pt")
    os.remove(path + ".sha256")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 4096)
        f.write(b"\x7f" * 8)
    r = train(out, "resume=auto", "stop_after=3", ckpt_every=1)
    check("has no digest file" in r.stdout + r.stderr, "no warning about the missing digest")


def case_6(d):
    """a resume whose config does not fit (architecture, iterations below the checkpoint) is
    refused with exit 2 before anything is written"""
    out = os.path.join(d, "fit")
    train(out, "stop_after=4")
    before = snapshot(out)
    refused(train(out, "resume=auto", "model=resnet50_small"), "model.arch", out, before)
    refused(train(out, "resume=auto", iterations=3), "schedule.iterations=3", out, before)


def _image_folder(root, train_classes, val_classes, per_class=4):
    for split, classes, n in (("train", train_classes, per_class), ("val", val_classes, 2)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c.rstrip("/")), exist_ok=True)
            for i in range(0 if c.endswith("/") else n):
                Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(os.path.join(root, split, c, f"{i}.png"))
    return root


def case_7(d):
    """bad inputs: one line naming the key, exit 2, nothing written"""
    afile = os.path.join(d, "afile")
    with open(afile, "w") as f:
        f.write("x")
    folder = lambda name, tr, va, n=4: ["data=imagefolder", f"data.root={_image_folder(os.path.join(d, name), tr, va, n)}"]  # noqa: E731
    cases = [
        ([f"out_dir={afile}"], "out_dir"),
        ([f"resume={afile}"], "resume="),
        (folder("empty", ["a", "b", "c/"], ["a", "b", "c"]), "data.train_dir"),
        (folder("differ", ["a", "b"], ["a", "c"]), "differ"),
        (folder("small", ["a", "b"], ["a", "b"], 2), "data.batch_size=8"),
        (["norm=gn", "norm.num_groups=7"], "norm.num_groups=7"),
        (["model.num_classes=2"], "model.num_classes=2"),
        (["stats.enabled=true", "stats.layers=[layer9.bn]"], "stats.layers"),
    ]
    if not torch.cuda.is_available():
        cases.append((["device=cuda"], "device=cuda"))
    for i, (args, key) in enumerate(cases):
        out = os.path.join(d, f"bad{i}")
        refused(train(out, *args), key, out)
    if not torch.cuda.is_available():
        good = os.path.join(d, "good")
        train(good, iterations=1)
        refused(cmd(["eval.py", f"ckpt={good}", "device=cuda"]), "device=cuda")


def case_8(d):
    """a second run on an out_dir in use stops at once in its own words, naming the holder's pid,
    exit 3 (not 2: the config is fine), nothing written"""
    out = os.path.join(d, "locked")
    first = subprocess.Popen([PY, "train_imagenet.py", *BASE, f"out_dir={out}", "schedule.iterations=100000"],
                             cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(os.path.join(out, "metrics.json"), first)
        r = train(out, "resume=auto", iterations=100000)
        refused(r, f"is in use by another run (pid {first.pid} on ", status=3)
        check(ours(r).startswith("error: out_dir=") and "invalid configuration" not in r.stderr, r.stderr.strip())
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=TIMEOUT)


#: Runs train_imagenet.py on a simulated full disk. DISK_FAULT=enospc:<part of a path>: writing any
#: file whose path holds it fails with ENOSPC after half its bytes (mabn.engine.files.write_bytes,
#: which every atomic write of the trainer goes through); DISK_FAULT=full: once out_dir is locked,
#: every write of a regular file fails (RLIMIT_FSIZE 0: EFBIG), log.txt included.
_FAULTY_DISK = """
import errno, os, resource, runpy, signal, sys
from mabn.engine import files, run
mode = os.environ["DISK_FAULT"]
if mode.startswith("enospc:"):
    part, real = mode.split(":", 1)[1], files.write_bytes
    def write(path, data):
        if part in path:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)
    files.write_bytes = write
else:
    lock = run.lock_out_dir
    def lock_then_fill(out_dir):
        f = lock(out_dir)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return f
    run.lock_out_dir = lock_then_fill
sys.argv = ["train_imagenet.py"] + sys.argv[1:]
runpy.run_path("train_imagenet.py", run_name="__main__")
"""
FAULTY_DISK = ("-c", _FAULTY_DISK)


def case_9(d):
    """disk full while writing checkpoint 4 (simulated ENOSPC): previous checkpoint untouched, no
    temporary left, status failed with the error; stale temporaries are removed at the next start"""
    out = os.path.join(d, "full")
    r = train(out, iterations=6, ckpt_every=2, runner=FAULTY_DISK, env={"DISK_FAULT": "enospc:ckpt_0000004"})
    check(r.returncode == 1 and "No space left on device" in one_line(r), f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
    files = sorted(os.listdir(os.path.join(out, "checkpoints")))
    check(files == ["ckpt_0000002.pt", "ckpt_0000002.pt.sha256"], f"checkpoints: {files}")
    check(checkpoint.load(os.path.join(out, "checkpoints", files[0]))["iteration"] == 2, "previous checkpoint damaged")
    m = metrics(out)
    check(m["status"] == "failed" and m["iteration"] == 4 and "No space left" in m.get("error", ""), str(m))
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    stale = os.path.join(out, "checkpoints", f"ckpt_0000004.pt.tmp.{dead.pid}")
    with open(stale, "wb") as f:
        f.write(b"half")
    r = train(out, "resume=auto", "stop_after=3", ckpt_every=2)
    check(r.returncode == 0 and not os.path.exists(stale), "stale temporary not removed")


def case_10(d):
    """milestones [10,10] and amp=fp16 on CPU are refused; torchrun + SIGTERM: the workers write a
    checkpoint and status interrupted (torchrun's own exit status is torch's: see README)"""
    out = os.path.join(d, "small")
    refused(train(out, "schedule.milestones=[3,3]"), "schedule.milestones", out)
    refused(train(out, "amp=fp16"), "amp=fp16", out)
    tr = os.path.join(d, "torchrun")
    proc = subprocess.Popen([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_imagenet.py", *BASE, f"out_dir={tr}", "schedule.iterations=100000"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(os.path.join(tr, "train_log.jsonl"), proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=TIMEOUT)
    m = metrics(tr)
    check(m["status"] == "interrupted" and ckpts(tr) == [f"ckpt_{m['iteration']:07d}.pt"], str(m))
    check(len(checkpoint.load(os.path.join(tr, "checkpoints", ckpts(tr)[0]))["ranks"]) == 2, "not both ranks")


def case_11(d):
    """tests size their work, not their patience: every subprocess timeout in tests/ is >= 900 s"""
    short = []
    for name in os.listdir(os.path.join(REPO, "tests")):
        if name.endswith(".py"):
            with open(os.path.join(REPO, "tests", name)) as f:
                for n, line in enumerate(f, 1):
                    short += [f"{name}:{n}" for t in re.findall(r"timeout=(\d+)", line) if int(t) < 900]
    check(not short, f"short timeouts: {short}")


def case_12(d):
    """a checkpoint whose pickle runs code (os.system) is refused by eval.py and resume=, and runs nothing"""
    marker = os.path.join(d, "payload_ran")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = os.path.join(d, "ckpt_0000001.pt")
    buf = io.BytesIO()
    torch.save({"iteration": 1, "model": {}, "config": {}, "x": Payload()}, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    with open(path + ".sha256", "w") as f:
        f.write(hashlib.sha256(buf.getvalue()).hexdigest() + "\n")
    refused(cmd(["eval.py", f"ckpt={path}"]), "refused")
    refused(train(os.path.join(d, "evil"), f"resume={path}"), "refused", os.path.join(d, "evil"))
    check(not os.path.exists(marker), "the payload ran")


def case_finished(d):
    """resume=auto on a finished record whose checkpoints are gone: "already finished", exit 0,
    nothing written"""
    out = os.path.join(d, "done")
    train(out, iterations=2)
    shutil.rmtree(os.path.join(out, "checkpoints"))
    before = snapshot(out, exclude=())
    r = train(out, "resume=auto", iterations=2)
    check(r.returncode == 0 and "already finished" in r.stdout, f"exit {r.returncode}: {r.stdout[-300:]}")
    check(snapshot(out, exclude=()) == before, "the record changed")


def case_13(d):
    """resume=auto into a run of another experiment (seed, normalization; finished or mid-run) is
    refused, one line naming the keys, nothing written; keys free to differ (data.workers,
    schedule.log_every, stop_after) may; a multirun over seeds into one out_dir trains one seed
    and stops at the second (exit 2) instead of reporting it done"""
    done, part = os.path.join(d, "done"), os.path.join(d, "part")
    train(done, iterations=4)
    train(part, "stop_after=2", iterations=4)
    for out in (done, part):
        before = snapshot(out)
        refused(train(out, "resume=auto", "seed=1", iterations=4), "seed=1 (the checkpoint's: 0)", out, before)
        refused(train(out, "resume=auto", "norm=bn_small", iterations=4), "norm.form='vanilla'", out, before)
    r = train(part, "resume=auto", "data.workers=2", "schedule.log_every=3", "stop_after=3", iterations=4)
    check(r.returncode == 0 and metrics(part)["iteration"] == 3, f"free keys refused: {r.stderr.strip()[-300:]}")
    multi = os.path.join(d, "multi")
    r = cmd(["train_imagenet.py", "-m", *overrides(f"out_dir={multi}", "schedule.iterations=2", "resume=auto",
                                                  "seed=0,1", f"hydra.sweep.dir={os.path.join(d, 'sweep')}")])
    check(r.returncode == 2 and "seed=1 (the checkpoint's: 0)" in r.stderr, f"multirun: exit {r.returncode}: "
                                                                             f"{r.stderr.strip()[-300:]}")
    check(metrics(multi)["status"] == "finished" and "seed: 0" in open(os.path.join(multi, "config.yaml")).read(),
          "the multirun's record is not seed 0's")


def case_14(d):
    """eval.py with a checkpoint that does not fit the model (model=resnet20 on a resnet8
    checkpoint): exit 2, one line naming model.arch (training's message), no state_dict traceback"""
    out = os.path.join(d, "r8")
    train(out, "model=resnet8", iterations=1)
    r = cmd(["eval.py", f"ckpt={out}", "model=resnet20", "device=cpu"])
    refused(r, "model.arch='resnet20' (the checkpoint's: 'resnet8')")
    check("does not fit this config" in r.stderr, r.stderr.strip())
    r = train(out, "model=resnet20", "resume=auto", iterations=2)
    refused(r, "model.arch='resnet20' (the checkpoint's: 'resnet8')")


def case_15(d):
    """a full disk after out_dir is locked, before the first checkpoint: ENOSPC writing env.json
    ends in one line, exit 1, metrics.json failed with the error, no env.json.tmp.* left; a disk
    that takes no byte (log.txt, config.yaml, metrics.json all fail) ends the same, with no
    temporary and no metrics.json"""
    out = os.path.join(d, "env")
    r = train(out, runner=FAULTY_DISK, env={"DISK_FAULT": "enospc:env.json"})
    check(r.returncode == 1 and "No space left on device" in one_line(r) and "env.json" in r.stderr,
          f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
    m = metrics(out)
    check(m["status"] == "failed" and "No space left on device" in m.get("error", ""), str(m))
    check(not temporaries(out) and not os.path.exists(os.path.join(out, "env.json")), f"left: {temporaries(out)}")
    out = os.path.join(d, "nothing")
    r = train(out, runner=FAULTY_DISK, env={"DISK_FAULT": "full"})
    check(r.returncode == 1 and "File too large" in one_line(r), f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
    check(not temporaries(out) and not os.path.exists(os.path.join(out, "metrics.json")),
          f"left: {sorted(os.listdir(out))}")


# A detection run of seconds (scripts/train_detection.py): the small Mask R-CNN at 64 px on a
# tiny built COCO-format set, steps of 4 images in groups of 2, CPU.
DET = ["device=cpu", "data.batch_size=4", "data.eval_batch_size=4", "data.val_images=4", "model.min_size=64",
       "model.max_size=64", "model.backbone_width=8", "model.fpn_channels=32", "model.fc_dim=64",
       "schedule.milestones=[]", "schedule.warmup_iters=0", "schedule.log_every=1", "schedule.eval_every=0",
       "norm.buffer_size=4", "progress_bar=false", "optim.lr=0.01"]


def _detection_data(d) -> str:
    """A tiny COCO-format instance set built from generated 64 px "photographs" of 3 classes."""
    from mabn.detection.synthetic import build_detection_dataset
    src = os.path.join(d, "photos")
    for split, n in (("train", 4), ("val", 2)):
        for c in range(3):
            os.makedirs(os.path.join(src, split, f"n0{c}"))
            for i in range(n):
                g = torch.Generator().manual_seed(c * 100 + i + (50 if split == "val" else 0))
                pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(src, split, f"n0{c}", f"{i}.JPEG"))
    root = os.path.join(d, "data")
    build_detection_dataset(root, seed=0, source=src, train_images=16, val_images=4, image_size=64,
                            max_objects=3, min_object_size=16, max_object_size=40)
    return root


def _weights_digest(out, iteration) -> str:
    state = torch.load(os.path.join(out, "checkpoints", f"ckpt_{iteration:07d}.pt"), weights_only=False)
    h = hashlib.sha256()
    for k, v in sorted(state["model"].items()):
        h.update(k.encode() + v.cpu().numpy().tobytes())
    return h.hexdigest()


def case_16(d):
    """detection: a SIGTERM mid-run, then resume=auto, ends with the weights of an uninterrupted
    run; a category id not in the file is refused (exit 2, named), nothing written"""
    root = _detection_data(d)
    run = ["scripts/train_detection.py", *DET, f"data.root={root}", "schedule.iterations=12"]
    straight, term = os.path.join(d, "straight"), os.path.join(d, "sigterm")
    r = cmd([*run, f"out_dir={straight}"])
    check(r.returncode == 0 and metrics(straight)["status"] == "finished", f"exit {r.returncode}: {r.stderr[-300:]}")
    proc = subprocess.Popen([PY, *run, f"out_dir={term}"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(os.path.join(term, "train_log.jsonl"), proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=TIMEOUT)
    m = metrics(term)
    check(proc.returncode == 0 and m["status"] == "interrupted" and m["iteration"] < 12, f"{m}: {output[-300:]}")
    r = cmd([*run, f"out_dir={term}", "resume=auto"])
    check(r.returncode == 0 and metrics(term)["status"] == "finished", f"resume: exit {r.returncode}: {r.stderr[-300:]}")
    check(_weights_digest(term, 12) == _weights_digest(straight, 12), "resumed weights differ from the uninterrupted run's")
    ann = os.path.join(root, "annotations", "instances_train.json")
    with open(ann) as f:
        data = json.load(f)
    data["annotations"][0]["category_id"] = 999
    with open(ann, "w") as f:
        json.dump(data, f)
    bad = os.path.join(d, "bad")
    r = cmd([*run, f"out_dir={bad}"])
    refused(r, "999", bad)


CASES = {"1": case_1, "2": case_2, "3": case_3, "4": case_4, "5": case_5, "6": case_6, "7": case_7,
         "8": case_8, "9": case_9, "10": case_10, "11": case_11, "12": case_12, "finished": case_finished,
         "13": case_13, "14": case_14, "15": case_15, "16": case_16}
#: The cheap cases (--quick; .ci/run): a few short runs each, no torchrun, no long waits.
QUICK = ("2", "6", "8", "9", "11", "12", "14", "15")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="*", help=f"cases to run, of {list(CASES)} (default: all)")
    p.add_argument("--quick", action="store_true", help=f"only the cheap cases {list(QUICK)}")
    p.add_argument("--keep", help="folder for the runs (kept); default: a temporary folder, removed")
    args = p.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; the cases are {list(CASES)}")
    if args.quick and args.cases:
        p.error("give cases or --quick, not both")
    root = args.keep or tempfile.mkdtemp(prefix="fault_drill_")
    failed = 0
    for name in args.cases or (QUICK if args.quick else CASES):
        d = os.path.join(root, f"case_{name}")
        os.makedirs(d, exist_ok=True)
        t0 = time.time()
        try:
            CASES[name](d)
            verdict = "PASS"
        except Exception as e:  # Failed, or anything unexpected: the case fails, the drill goes on
            verdict, failed = f"FAIL ({type(e).__name__}: {e})", failed + 1
        summary = " ".join(CASES[name].__doc__.split())
        print(f"{verdict.split(' ')[0]:4} {name:>8}  {summary} [{time.time() - t0:.0f} s]"
              + (f"\n              {verdict[5:]}" if failed and verdict != "PASS" else ""), flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
