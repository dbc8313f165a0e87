"""The run directory: logging, provenance, metrics.json and the JSON-lines training log.

Layout of ``out_dir``::

    config.yaml      the resolved configuration
    env.json         git commit (and whether the tree was dirty), package versions, CPU model and the
                     instruction set torch's kernels use, world size, command
    log.txt          the rank-0 log
    .lock            held (flock) by the run writing this folder; holds its pid and host
    train_log.jsonl  one JSON object per training log line (iteration, loss, errors, lr, speed)
    metrics.json     the final (or current) result: status finished | diverged | interrupted |
                     failed (with the error) | running
    tb/              TensorBoard events
    checkpoints/     ckpt_<iteration>.pt (+ .sha256)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys

import torch
from omegaconf import OmegaConf

from . import files
from .machine import cpu_capability, cpu_identity, cpu_model

__all__ = ["setup_logging", "start_log_file", "lock_out_dir", "OutDirInUse", "write_provenance",
           "write_json", "read_json", "append_jsonl", "one_line"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Buffer(logging.Handler):
    """Keeps the records logged before the run directory may be written (see start_log_file)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def setup_logging(out_dir: str | None, is_main: bool, stream=None, defer_file: bool = False) -> None:
    """INFO to ``stream`` (default stdout) and out_dir/log.txt on rank 0, warnings only on the
    other ranks. With ``defer_file`` nothing is written to out_dir yet: the records are kept
    until :func:`start_log_file` (so a run refused at start-up leaves no trace in out_dir)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_mabn", False):
            root.removeHandler(h)
            h.close()
    handlers = [logging.StreamHandler(stream or sys.stdout)]
    if is_main and out_dir:
        handlers.append(_Buffer() if defer_file else _file_handler(out_dir))
    for h in handlers:
        _attach(root, h)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


class _LogFile(logging.FileHandler):
    """out_dir/log.txt. A failed write (a full disk) is raised to the code that logged, once, so
    that the run ends as failed with that error (logging's default prints a traceback and goes
    on); after it the handler writes nothing more, so that logging the failure cannot fail too."""

    failed = False

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def handleError(self, record):
        exc = sys.exc_info()[1]
        if self.failed or not isinstance(exc, OSError):
            return super().handleError(record)
        self.failed = True
        raise OSError(exc.errno, f"{exc.strerror} (writing {self.baseFilename})") from exc

    def close(self):
        with contextlib.suppress(OSError):  # the unwritten tail of a full disk
            super().close()


def _file_handler(out_dir: str) -> logging.Handler:
    os.makedirs(out_dir, exist_ok=True)
    return _LogFile(os.path.join(out_dir, "log.txt"))


def _attach(root: logging.Logger, handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._mabn = True
    root.addHandler(handler)


def start_log_file(out_dir: str) -> None:
    """Start out_dir/log.txt (rank 0 of a run set up with ``defer_file``), beginning with the
    records logged so far."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _Buffer) and getattr(h, "_mabn", False):
            root.removeHandler(h)
            fh = _file_handler(out_dir)
            _attach(root, fh)
            for record in h.records:
                fh.handle(record)


class OutDirInUse(RuntimeError):
    """Another process holds the run directory's lock: not a bad configuration (the same command
    runs once the other run has ended), so it has its own exit status (train_imagenet.py)."""


def lock_out_dir(out_dir: str):
    """Take an exclusive lock on ``out_dir`` for the life of this process (flock on out_dir/.lock,
    released by the kernel when the process ends, however it ends) and write our pid and host into
    the lock file. Raises :class:`OutDirInUse`, naming the holder, if another process has it.
    Returns the open lock file (keep a reference to keep the lock)."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        f.seek(0)
        holder = f.read().strip() or "unknown pid"
        f.close()
        raise OutDirInUse(f"out_dir={out_dir} is in use by another run ({holder}); wait for it to end "
                          f"or choose another out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


_MAX_CHANGES = 100  # env.json's git_changes keeps this many `git status` lines


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.rstrip()
    except Exception:
        return None


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_provenance(cfg, out_dir: str, world_size: int) -> None:
    """config.yaml and env.json (git commit, package versions, hardware: CPU model and the
    instruction set torch's kernels use, GPUs; command line)."""
    os.makedirs(out_dir, exist_ok=True)
    files.atomic_write({os.path.join(out_dir, "config.yaml"): OmegaConf.to_yaml(cfg)})
    status = _git("status", "--porcelain")
    changes = None if status is None else status.splitlines()
    if changes is not None and len(changes) > _MAX_CHANGES:
        changes = changes[:_MAX_CHANGES] + [f"... and {len(changes) - _MAX_CHANGES} more"]
    env = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if changes is None else bool(changes),
        # what made it dirty: `git status --porcelain` lines (" M mabn/norm.py", "?? notes.txt")
        "git_changes": changes,
        "packages": {p: _version(p) for p in ("torch", "torchvision", "hydra-core", "omegaconf",
                                              "tensorboard", "tqdm", "numpy", "pillow")},
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "world_size": world_size,
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_id": cpu_identity(),
        "torch_threads": torch.get_num_threads(),
        "command": sys.argv,
    }
    write_json(os.path.join(out_dir, "env.json"), env)


def write_json(path: str, obj) -> None:
    """Atomically write ``obj`` as JSON (:func:`mabn.engine.files.atomic_write`: no temporary file
    is left if it fails)."""
    files.atomic_write({path: json.dumps(obj, indent=2, allow_nan=True) + "\n"})


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: str, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: the summary a failure is recorded (metrics.json) and
    reported (stderr) with."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
