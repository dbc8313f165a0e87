#!/usr/bin/env python
"""What bounds a normalization layer on this CPU: memory bandwidth, page faults, or neither.

1. Measures this machine's memory bandwidth with large copies and adds into preallocated tensors
   (bytes read + written per second), and the cost of a *fresh* allocation of the same size (the
   first write to newly mapped pages: a page fault per 4 KiB page, or per 2 MiB with transparent
   huge pages).
2. For each ResNet-50 shape, times nn.BatchNorm2d and MABN2d (b = 2) forward+backward (round-robin
   medians, as scripts/bench_norm.py) and compares each with the *traffic floor*: the bytes any
   batch-statistics layer must move, at the measured bandwidth.

The floor counts, for E float32 elements (4 bytes each), the passes of a fully fused
implementation: forward statistics (read x), normalization (read x, write y), backward reductions
(read dL/dy and x), input gradient (read dL/dy and x, write dL/dx): 8 E x 4 bytes. The layer's
two fresh full-size tensors (y and dL/dx) add 2 E x 4 bytes of first-touch page faults; the
"floor + faults" column adds their measured cost.

With ``--allocator keep`` freed memory stays in the process (mabn.lab.bench.set_allocator):
the fault cost then measures ~0, and the layers are timed without it, as a GPU's caching
allocator runs them.

    python scripts/bench_floor.py                     # 2 threads, CPU, all four shapes
    python scripts/bench_floor.py --allocator keep    # the same without first-touch page faults
    python scripts/bench_floor.py --threads 1 --out results/floor.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch
from torch import nn

import mabn
from mabn.lab import bench

SHAPES = ["32x256x56x56", "32x512x28x28", "32x1024x14x14", "32x2048x7x7"]
#: Full-tensor passes of a fused batch-statistics layer, forward + backward (module docstring).
FLOOR_PASSES = 8


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth(mib: int, repeats: int) -> dict[str, float]:
    """GB/s (read + written bytes) of copy and add into preallocated tensors, and the seconds per
    GB of a fresh allocation's first write (page faults), each a median over ``repeats``."""
    n = mib * (1 << 20) // 4
    a, b, out = torch.rand(n), torch.rand(n), torch.empty(n)
    out.fill_(0)
    nbytes = n * 4
    copy = median_time(lambda: out.copy_(a), repeats)
    add = median_time(lambda: torch.add(a, b, out=out), repeats)
    fill = median_time(lambda: out.fill_(1.0), repeats)
    fresh = median_time(lambda: torch.empty(n).fill_(1.0), repeats)
    return {"copy": 2 * nbytes / copy / 1e9, "add": 3 * nbytes / add / 1e9,
            "fault_s_per_gb": max(fresh - fill, 0.0) / (nbytes / 1e9)}


def layer_times(shape, fmt, repeats: int) -> dict[str, float]:
    n, c, h, w = shape
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    up = torch.randn(shape).contiguous(memory_format=fmt)
    layers = {"BN": nn.BatchNorm2d(c),
              "MABN": mabn.MABN2d(c, norm_batch_size=2, renorm_warmup_iters=0)}
    times = {k: [] for k in layers}

    def run(layer):
        layer(x).backward(up)
        x.grad = None

    for layer in layers.values():
        run(layer)
    for _ in range(repeats):  # round-robin: machine noise hits every layer alike
        for k, layer in layers.items():
            t = time.perf_counter()
            run(layer)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--mib", type=int, default=256, help="size of the bandwidth test tensors")
    p.add_argument("--shapes", nargs="+", default=SHAPES)
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    bench.add_allocator_argument(p)
    bench.add_kernels_argument(p)
    args = p.parse_args(argv)
    bench.apply_allocator(p, args)
    bench.apply_kernels(args)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
        assert all(len(s) == 4 for s in shapes)
    except (ValueError, AssertionError):
        print(f"error: --shapes must look like 32x256x56x56, got {args.shapes}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    bw = bandwidth(args.mib, args.repeats)
    floor_bw = bw["copy"]  # GB/s of a streaming read + write
    lines = [
        f"Command: `python scripts/bench_floor.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"Machine: {bench.machine_description(torch.device('cpu'))}; load average {bench.load_average()}; "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Memory bandwidth ({args.mib} MiB tensors, preallocated): copy {bw['copy']:.1f} GB/s, "
        f"add {bw['add']:.1f} GB/s (bytes read + written). A fresh allocation's first write costs "
        f"{bw['fault_s_per_gb'] * 1e3:.0f} ms per GB more than writing preallocated memory "
        f"(page faults).",
        "",
        "| shape | layout | floor ms | floor + faults ms | BN ms | MABN ms | MABN / BN | BN % of floor | MABN % of floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        elems = shape[0] * shape[1] * shape[2] * shape[3]
        floor = FLOOR_PASSES * elems * 4 / (floor_bw * 1e9)
        faults = 2 * elems * 4 / 1e9 * bw["fault_s_per_gb"]
        for name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            t = layer_times(shape, fmt, args.repeats)
            lines.append(
                f"| {'x'.join(map(str, shape))} | {name} | {floor * 1e3:.2f} | {(floor + faults) * 1e3:.2f} | "
                f"{t['BN'] * 1e3:.2f} | {t['MABN'] * 1e3:.2f} | {t['MABN'] / t['BN']:.2f}x | "
                f"{100 * floor / t['BN']:.0f}% | {100 * floor / t['MABN']:.0f}% |")
            print(lines[-1], flush=True)
    bench.write_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
