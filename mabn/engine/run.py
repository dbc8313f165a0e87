"""The run directory: logging, provenance, metrics.json and the JSON-lines training log.

Layout of ``out_dir``::

    config.yaml      the resolved configuration
    env.json         git commit (and whether the tree was dirty), package versions, world size, command
    log.txt          the rank-0 log
    train_log.jsonl  one JSON object per training log line (iteration, loss, errors, lr, speed)
    metrics.json     the final (or current) result: status finished | diverged | interrupted | running
    tb/              TensorBoard events
    checkpoints/     ckpt_<iteration>.pt (+ .sha256)
"""

from __future__ import annotations

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

__all__ = ["setup_logging", "write_provenance", "write_json", "read_json", "append_jsonl"]

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_logging(out_dir: str | None, is_main: bool, stream=None) -> None:
    """INFO to ``stream`` (default stdout) and out_dir/log.txt on rank 0, warnings only on the
    other ranks."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_mabn", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(stream or sys.stdout)]
    if is_main and out_dir:
        os.makedirs(out_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(out_dir, "log.txt")))
    for h in handlers:
        h.setFormatter(fmt)
        h._mabn = True
        root.addHandler(h)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except Exception:
        return None


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_provenance(cfg, out_dir: str, world_size: int) -> None:
    """config.yaml and env.json (git commit, package versions, hardware, command line)."""
    os.makedirs(out_dir, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))
    status = _git("status", "--porcelain")
    env = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "packages": {p: _version(p) for p in ("torch", "torchvision", "hydra-core", "omegaconf",
                                              "tensorboard", "tqdm", "numpy", "pillow")},
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "world_size": world_size,
        "host": socket.gethostname(),
        "command": sys.argv,
    }
    write_json(os.path.join(out_dir, "env.json"), env)


def write_json(path: str, obj) -> None:
    """Atomically (temp file + rename) write ``obj`` as JSON."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: str, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
