"""Checkpoint files: atomic writes, keep-last-K, integrity check, data-only loading.

A checkpoint is ``<dir>/ckpt_<iteration:07d>.pt`` (a ``torch.save`` dict of tensors and plain
containers: dicts, lists, strings, numbers) plus ``<file>.sha256`` holding its digest. Both are
written to temporary files in the same folder and moved into place with ``os.replace`` only once
both are complete (:func:`mabn.engine.files.atomic_write`), so a crash or a full disk never leaves
a half-written file under a final name, nor a temporary, and never touches the previous
checkpoints.

Loading is data only (``torch.load(..., weights_only=True)``): a file whose pickle asks for any
Python object other than tensors and plain containers is refused without running anything. A
digest mismatch, an unreadable file or such a refusal is a :class:`CheckpointError`; a file
without its digest is loaded with a warning (its integrity cannot be checked).
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import pickle
import re

import torch

from . import files

__all__ = ["CheckpointError", "checkpoint_path", "list_checkpoints", "save", "load", "load_latest",
           "find_latest", "remove_stale_temporaries"]

log = logging.getLogger(__name__)
_NAME = re.compile(r"ckpt_(\d+)\.pt$")
_TMP = re.compile(r"\.tmp\.(\d+)$")
REQUIRED_KEYS = ("iteration", "model", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, corrupted, not a checkpoint, or holding
    Python objects that data-only loading refuses), or one that could not be written."""


def checkpoint_path(ckpt_dir: str, iteration: int) -> str:
    return os.path.join(ckpt_dir, f"ckpt_{iteration:07d}.pt")


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Checkpoint files in ``ckpt_dir``, newest (highest iteration) first."""
    found = [f for f in glob.glob(os.path.join(ckpt_dir, "ckpt_*.pt")) if _NAME.search(f)]
    return sorted(found, key=lambda f: int(_NAME.search(f).group(1)), reverse=True)


def _by_write_order(paths: list[str]) -> list[str]:
    """Newest written first (modification time, then iteration)."""
    return sorted(paths, key=lambda f: (os.stat(f).st_mtime_ns, int(_NAME.search(f).group(1))), reverse=True)


def save(state: dict, ckpt_dir: str, keep: int) -> str:
    """Write ``state`` as the checkpoint of ``state["iteration"]``, then keep the ``keep`` most
    recently written checkpoints (by write order, so a file is never deleted while an older one is
    kept). A failed write (e.g. a full disk) raises :class:`CheckpointError` and leaves the folder
    as it was."""
    os.makedirs(ckpt_dir, exist_ok=True)
    path = checkpoint_path(ckpt_dir, int(state["iteration"]))
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    try:
        files.atomic_write({path: data, path + ".sha256": hashlib.sha256(data).hexdigest() + "\n"})
    except OSError as e:
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
        raise CheckpointError(f"writing checkpoint {path} failed ({cause.strerror or cause}); the previous "
                              f"checkpoints are untouched") from e
    for old in _by_write_order(list_checkpoints(ckpt_dir))[keep:]:
        if old == path:  # pragma: no cover  (the file just written is the newest)
            continue
        for f in (old, old + ".sha256"):
            if os.path.exists(f):
                os.remove(f)
    return path


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove ``*.tmp.<pid>`` files left in ``folder`` by processes that no longer run (a crash in
    the middle of a write). Returns the removed paths."""
    removed = []
    for f in glob.glob(os.path.join(glob.escape(folder), "*.tmp.*")):
        m = _TMP.search(f)
        if m is None or _alive(int(m.group(1))):
            continue
        os.remove(f)
        removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid cannot be mid-write at start-up: an earlier process had it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: str) -> dict:
    """Read, verify and load one checkpoint (on CPU, data only). Raises :class:`CheckpointError`
    if unusable."""
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
    else:
        log.warning("checkpoint %s has no digest file %s: its integrity cannot be checked", path, digest_file)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # the pickle asks for a Python object: refused, nothing was run
            raise CheckpointError(
                f"checkpoint {path} is refused: it asks for the Python object {found.group(1)}, and "
                f"checkpoints are loaded as data only (tensors and plain containers). Checkpoints "
                f"written by mabn before checkpoints were data only are refused this way too: "
                f"they cannot be resumed or evaluated by this version") from None
        raise CheckpointError(f"checkpoint {path} is corrupted or not a checkpoint (it does not "
                              f"unpickle as data)") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or not a checkpoint: {type(e).__name__}: {e}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a mabn checkpoint (missing {missing})")
    return state


def find_latest(ckpt_dir: str) -> tuple[tuple[dict, str] | None, list[str]]:
    """(the newest usable checkpoint in ``ckpt_dir`` and its path, or None; the paths of the
    newer files rejected on the way, each reported with log.error)."""
    rejected = []
    for path in list_checkpoints(ckpt_dir):
        try:
            return (load(path), path), rejected
        except CheckpointError as e:
            log.error("%s -- rejected; falling back to the previous checkpoint", e)
            rejected.append(path)
    return None, rejected


def load_latest(ckpt_dir: str) -> tuple[dict, str] | None:
    """The newest usable checkpoint in ``ckpt_dir`` and its path, or None if there is none.
    Unusable newer files are reported with log.error and skipped."""
    return find_latest(ckpt_dir)[0]
