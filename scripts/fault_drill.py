"""Fault drill of the trainer (issue 11): every failure case on short synthetic CPU runs, one line
per case, PASS or FAIL; exit status 1 if any case fails.

    python scripts/fault_drill.py                 # every case (a few minutes on 2 cores)
    python scripts/fault_drill.py 1 7 12          # only these cases
    python scripts/fault_drill.py --keep /tmp/d   # keep the run folders there

Each case runs ``train_imagenet.py`` (or ``eval.py``, or ``torchrun``) as a user would and checks
what README.md's "Failure behaviour" promises: the exit status, the message, metrics.json, the
checkpoints, and that a refused run wrote nothing.
"""

from __future__ import annotations

import argparse
import errno
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


def train(out, *args, iterations=6, ckpt_every=100):
    return cmd(["train_imagenet.py", *BASE, f"out_dir={out}", f"schedule.iterations={iterations}",
                f"schedule.ckpt_every={ckpt_every}", *args])


def cmd(args):
    return subprocess.run([PY, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def metrics(out) -> dict:
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def ckpts(out) -> list[str]:
    from mabn.engine import checkpoint
    return [os.path.basename(f) for f in checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))]


def snapshot(folder, exclude=(".lock",)) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), folder)
            if rel not in exclude:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def refused(r, key, out=None, before=None) -> None:
    """Exit 2, one line naming ``key``, no traceback; out_dir absent or unchanged."""
    check(r.returncode == 2, f"exit {r.returncode}, wanted 2: {r.stderr.strip()[-300:]}")
    check(key in r.stderr and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0,
          f"not one line naming {key!r}: {r.stderr.strip()[-300:]}")
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
    """a crash (exception at iteration 3) leaves status failed, the iteration and the error"""
    out = os.path.join(d, "crash")
    r = train(out, "debug.fail_at=3")
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
    from PIL import Image
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
    import torch
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
    """a second run on an out_dir in use stops at once, naming the holder's pid"""
    out = os.path.join(d, "locked")
    first = subprocess.Popen([PY, "train_imagenet.py", *BASE, f"out_dir={out}", "schedule.iterations=100000"],
                             cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(os.path.join(out, "metrics.json"), first)
        r = train(out, "resume=auto", iterations=100000)
        refused(r, f"pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=TIMEOUT)


_FULL_DISK = """
import errno, os, runpy, sys
from mabn.engine import checkpoint
real = checkpoint._write_bytes
def write(path, data):
    if "ckpt_0000004" in path:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real(path, data)
checkpoint._write_bytes = write
sys.argv = ["train_imagenet.py"] + sys.argv[1:]
runpy.run_path("train_imagenet.py", run_name="__main__")
"""


def case_9(d):
    """disk full while writing checkpoint 4 (simulated ENOSPC): previous checkpoint untouched, no
    temporary left, status failed with the error; stale temporaries are removed at the next start"""
    out = os.path.join(d, "full")
    r = cmd(["-c", _FULL_DISK, *BASE, f"out_dir={out}", "schedule.iterations=6", "schedule.ckpt_every=2"])
    check(r.returncode == 1 and "No space left on device" in r.stderr and "Traceback" not in r.stderr,
          f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
    files = sorted(os.listdir(os.path.join(out, "checkpoints")))
    check(files == ["ckpt_0000002.pt", "ckpt_0000002.pt.sha256"], f"checkpoints: {files}")
    from mabn.engine import checkpoint
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
    from mabn.engine import checkpoint
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
    import torch
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


CASES = {"1": case_1, "2": case_2, "3": case_3, "4": case_4, "5": case_5, "6": case_6, "7": case_7,
         "8": case_8, "9": case_9, "10": case_10, "11": case_11, "12": case_12, "finished": case_finished}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="*", help=f"cases to run, of {list(CASES)} (default: all)")
    p.add_argument("--keep", help="folder for the runs (kept); default: a temporary folder, removed")
    args = p.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; the cases are {list(CASES)}")
    root = args.keep or tempfile.mkdtemp(prefix="fault_drill_")
    failed = 0
    for name in args.cases or CASES:
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
