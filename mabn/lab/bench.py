"""Helpers of the benchmark scripts (scripts/bench_*.py): the device, round-robin timing, the CPU
allocator and kernel options, argument checks, and the description of the machine that goes with
every figure.

Round-robin timing: each repeat runs every candidate once, in a fixed order, so that noise from
other processes hits all of them alike; a candidate's figure is the median over repeats. On CUDA
every timed call is bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import time
from typing import Callable

import torch

from mabn import kernels
from mabn.engine import files
from mabn.engine.machine import cpu_capability, cpu_identity, cpu_model, load_average

__all__ = ["write_report", "resolve_device", "sync", "timed", "round_robin", "spread", "cpu_model", "cpu_capability",
           "load_average", "machine_description", "ALLOCATORS", "set_allocator", "add_allocator_argument",
           "apply_allocator", "allocator_description", "require_positive", "require_shapes", "add_kernels_argument",
           "apply_kernels", "kernels_description"]


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; ValueError (with a message for the command line) when the name is
    not a device or names a CUDA device that is not there."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a device ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here "
                             f"(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                device: torch.device, progress: Callable[[int, dict], None] | None = None) -> dict[str, list[float]]:
    """{name: [seconds per timed repeat]}: ``warmup + repeats`` rounds, each calling every fn once,
    in the order given in even rounds (0, 2, ...) and in the reverse order in odd ones, so that
    neither a drift of the machine's speed within a round nor what the previous call leaves in the
    caches and the allocator favours the fns that come first (A B, B A, A B, ...: a ratio of two
    fns is paired in both orders). The first ``warmup`` rounds are not recorded.
    ``progress(round, last)`` is called after each recorded round with that round's times, in the
    given order."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(warmup + repeats):
        order = names if rep % 2 == 0 else names[::-1]
        ran = {name: timed(fns[name], device) for name in order}
        last = {name: ran[name] for name in names}
        if rep >= warmup:
            for name, t in last.items():
                times[name].append(t)
            if progress:
                progress(rep - warmup + 1, last)
    return times


def spread(xs: list[float]) -> float:
    """(max - min) / median, in percent."""
    m = statistics.median(xs)
    return 100.0 * (max(xs) - min(xs)) / m if m else 0.0


#: ``--allocator`` choices of the CPU benchmarks. "default": the C library's malloc as the
#: process got it. "keep": glibc's malloc told to keep freed memory in the process (see
#: :func:`set_allocator`), so that no timed call pays first-touch page faults for memory it
#: allocates, as on a GPU with torch's caching allocator.
ALLOCATORS = ("default", "keep")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, glibc's <malloc.h>
_allocator = "default"


def set_allocator(name: str) -> None:
    """Choose how freed CPU memory is handled for the rest of the process (call it first).

    Why it matters: torch's CPU tensors come from malloc, and glibc serves large ones (above a
    threshold of at most 32 MiB) with fresh ``mmap`` pages that go back to the OS when freed, and
    trims the heap when its free top grows large. Every fresh page then costs a page fault on its
    first write, and that cost differs a lot between machines (scripts/bench_floor.py measures
    it: from about 140 ms per GB on an Intel Xeon to 420-470 ms per GB on an AMD EPYC virtual
    machine). A layer's forward+backward writes two fresh full-size tensors, so
    that cost is shared by every layer compared and moves their ratios with the machine.
    ``"keep"`` calls ``mallopt(M_MMAP_MAX, 0)`` (no mmap'd chunks) and
    ``mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)`` (no trimming): freed memory is reused without
    faults. ValueError for an unknown name; RuntimeError where there is no glibc mallopt."""
    global _allocator
    if name not in ALLOCATORS:
        raise ValueError(f"--allocator {name!r}: choose one of {', '.join(ALLOCATORS)}")
    if name == "keep":
        path = ctypes.util.find_library("c")
        mallopt = getattr(ctypes.CDLL(path), "mallopt", None) if path else None
        if mallopt is None or not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
            raise RuntimeError("--allocator keep needs glibc's mallopt (Linux with glibc); "
                               "use --allocator default")
    _allocator = name


def add_allocator_argument(parser) -> None:
    """The ``--allocator`` option of a CPU benchmark script (see :func:`set_allocator`)."""
    parser.add_argument("--allocator", choices=ALLOCATORS, default="default",
                        help="CPU memory: 'default' malloc, or 'keep' freed memory in the process "
                             "(no first-touch page faults in the timed calls; glibc only)")


def apply_allocator(parser, args) -> None:
    """:func:`set_allocator` with ``args.allocator``; a command-line error (exit 2) where it cannot."""
    try:
        set_allocator(args.allocator)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))


def allocator_description() -> str:
    """How CPU memory is allocated here: :func:`set_allocator`'s choice, and the environment
    variables that change malloc or torch's CPU allocations (LD_PRELOAD of jemalloc/tcmalloc,
    glibc's MALLOC_* tunables, torch's THP_MEM_ALLOC_ENABLE) when set."""
    s = ("glibc malloc keeping freed memory (--allocator keep: no mmap, no trim)" if _allocator == "keep"
         else "the C library's malloc, default settings (--allocator default)")
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if k in ("LD_PRELOAD", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES") or k.startswith("MALLOC_")]
    return s + (f"; environment: {' '.join(env)}" if env else "")


def require_positive(parser, args, *keys: str) -> None:
    """``parser.error`` (exit 2) naming the first option among ``keys`` (argparse dests) below 1."""
    for key in keys:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")


def require_shapes(parser, shapes, norm_batch_size: int) -> None:
    """``parser.error`` (exit 2) naming the first ``--shapes`` entry that is not NxCxHxW with
    positive integers or whose N is not a multiple of ``norm_batch_size``."""
    for shape in shapes:
        parts = shape.split("x")
        if len(parts) != 4 or not all(v.isdigit() and int(v) > 0 for v in parts):
            parser.error(f"--shapes {shape!r}: expected NxCxHxW with positive integers, e.g. 32x256x56x56")
        if int(parts[0]) % norm_batch_size:
            parser.error(f"--shapes {shape!r}: N={parts[0]} is not divisible by --norm-batch-size={norm_batch_size}")


def add_kernels_argument(parser) -> None:
    """``--cpu-kernels {auto,off}``: mabn.kernels.MODE, the C++ kernels of eager CPU layers."""
    parser.add_argument("--cpu-kernels", choices=("auto", "off"), default="auto",
                        help="mabn.kernels.MODE for eager CPU layers: auto (mabn's C++ kernels, built on "
                             "first use: 30-60 s the first time on a machine, then cached) or off (torch "
                             "operations only)")


def apply_kernels(args) -> None:
    """Set mabn.kernels.MODE from ``--cpu-kernels``; with "auto", build (or load) the kernels now,
    so that no timed call pays for it."""
    kernels.MODE = args.cpu_kernels
    if kernels.MODE == "auto":
        kernels.load()


def parse_and_apply(parser, argv=None) -> tuple[argparse.Namespace, torch.device]:
    """The command line of a benchmark with ``--allocator``, ``--cpu-kernels`` and ``--device``,
    parsed and applied (:func:`apply_allocator`, :func:`apply_kernels`): the arguments and the
    device. A bad value is a command-line error (exit 2)."""
    args = parser.parse_args(argv)
    apply_allocator(parser, args)
    apply_kernels(args)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    return args, device


def kernels_description() -> str:
    """Which path eager mabn layers take on the CPU in this process (mabn.kernels.status)."""
    return kernels.status()


def machine_description(device: torch.device) -> str:
    """CPU model, logical cores, torch version and intra-op threads, the CPU allocator, the path
    of eager mabn layers on the CPU (mabn.kernels), plus the GPU on CUDA."""
    ident = cpu_identity()
    family = f"family {ident['family']} model {ident['model']}, " if ident.get("family") else ""
    s = (f"{cpu_model()} ({family}torch CPU kernels: {cpu_capability()}), {os.cpu_count()} logical cores, "
         f"torch {torch.__version__}, "
         f"{torch.get_num_threads()} intra-op threads; CPU memory: {allocator_description()}; "
         f"eager mabn layers on the CPU: {kernels_description()}")
    if device.type == "cuda":
        s += f"; GPU: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return s


def write_report(text: str, path: str | None) -> None:
    """Print a benchmark's markdown report and, with ``path``, write it there atomically
    (:func:`mabn.engine.files.atomic_write`: an interrupted run leaves no half-written file)."""
    print(text)
    if path:
        files.atomic_write({path: text})
