"""Checkpoint files: atomic writes, keep-last-K, integrity check and fallback to an older file.

A checkpoint is ``<dir>/ckpt_<iteration:07d>.pt`` (a plain ``torch.save`` dict, loadable with
``torch.load(path, weights_only=False)``) plus ``<file>.sha256`` holding its digest. Both are
written to a temporary file in the same folder and moved into place with ``os.replace``, so a
crash never leaves a half-written file under the final name. On loading, a digest mismatch or an
unreadable file is a :class:`CheckpointError`; :func:`load_latest` then falls back to the next
older checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import re

import torch

__all__ = ["CheckpointError", "checkpoint_path", "list_checkpoints", "save", "load", "load_latest"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"ckpt_(\d+)\.pt$")
REQUIRED_KEYS = ("iteration", "model", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, corrupted or not a checkpoint)."""


def checkpoint_path(ckpt_dir: str, iteration: int) -> str:
    return os.path.join(ckpt_dir, f"ckpt_{iteration:07d}.pt")


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Checkpoint files in ``ckpt_dir``, newest (highest iteration) first."""
    files = [f for f in glob.glob(os.path.join(ckpt_dir, "ckpt_*.pt")) if _NAME.search(f)]
    return sorted(files, key=lambda f: int(_NAME.search(f).group(1)), reverse=True)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(state: dict, ckpt_dir: str, keep: int) -> str:
    """Write ``state`` as the checkpoint of ``state["iteration"]``; keep the newest ``keep``."""
    os.makedirs(ckpt_dir, exist_ok=True)
    path = checkpoint_path(ckpt_dir, int(state["iteration"]))
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    _atomic_write(path, data)
    _atomic_write(path + ".sha256", hashlib.sha256(data).hexdigest().encode() + b"\n")
    for old in list_checkpoints(ckpt_dir)[keep:]:
        for f in (old, old + ".sha256"):
            if os.path.exists(f):
                os.remove(f)
    return path


def load(path: str) -> dict:
    """Read and verify one checkpoint (on CPU). Raises :class:`CheckpointError` if unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    digest_file = path + ".sha256"
    if os.path.exists(digest_file):
        with open(digest_file) as f:
            expected = f.read().strip()
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"checkpoint {path} is corrupted: its SHA-256 does not match {digest_file}")
    try:
        # Our own files; they hold Python/numpy RNG states, which weights_only loading rejects.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or not a checkpoint: {type(e).__name__}: {e}") from e
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a mabn checkpoint (missing {missing})")
    return state


def load_latest(ckpt_dir: str) -> tuple[dict, str] | None:
    """The newest usable checkpoint in ``ckpt_dir`` and its path, or None if there is none.
    Unusable newer files are reported with log.error and skipped."""
    for path in list_checkpoints(ckpt_dir):
        try:
            return load(path), path
        except CheckpointError as e:
            log.error("%s -- rejected; falling back to the previous checkpoint", e)
    return None
