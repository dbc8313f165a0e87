"""Writing files so that a crash or a full disk never leaves a half-written file under its final
name, nor a temporary file behind.

Every file of a run directory that is rewritten as a whole (checkpoints and their digests,
metrics.json, env.json, config.yaml, a truncated log) goes through :func:`atomic_write`: each
file is written to ``<path>.tmp.<pid>`` and flushed to the disk, and only once all of them are
complete are they renamed into place. On any failure the temporaries are removed and the error is
raised; the files under their final names are then as they were.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["write_bytes", "atomic_write", "temporary_path"]


def temporary_path(path: str) -> str:
    """The temporary file of ``path`` written by this process (``*.tmp.<pid>``: a leftover of a
    dead process is recognized, and removed, by the next run)."""
    return f"{path}.tmp.{os.getpid()}"


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and flush it to the disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(files: dict[str, bytes | str]) -> None:
    """Write every ``{path: data}`` (str is written as UTF-8) to its temporary file; when all are
    complete, rename them into place. On failure (e.g. ENOSPC) no temporary is left and the error
    (an OSError naming the file) is raised."""
    tmps = {path: temporary_path(path) for path in files}
    path = None
    try:
        for path, data in files.items():
            write_bytes(tmps[path], data.encode() if isinstance(data, str) else data)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException as e:
        for tmp in tmps.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # name the file it was writing
            raise OSError(e.errno, f"{e.strerror} (writing {path})") from e
        raise
