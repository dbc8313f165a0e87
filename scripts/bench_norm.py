#!/usr/bin/env python
"""Forward+backward time of the mabn presets against nn.BatchNorm2d at ResNet-50 shapes.

Every layer is timed on the same input and upstream gradient, round-robin (one repeat of each in
turn, so that machine noise hits all of them alike; in reverse order every other round, so that
none always runs first); the table reports the median time per
forward+backward and its ratio to nn.BatchNorm2d measured in the same run.

With --compile every layer, nn.BatchNorm2d included, is wrapped in its own torch.compile
(mabn.engine.compiling.compile_module, as the trainer's compile=true) and timed the same way
against compiled nn.BatchNorm2d; the first forward+backward of each compiled layer (the
compilation, per shape) is reported in a second table and not counted in the medians.

    python scripts/bench_norm.py                       # CPU, all four shapes, eager
    python scripts/bench_norm.py --compile             # the same, each layer compiled
    python scripts/bench_norm.py --device cuda --out results/bench_norm_cuda.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch
from torch import nn

import mabn
from mabn.engine import bench, compiling

SHAPES = ["32x256x56x56", "32x512x28x28", "32x1024x14x14", "32x2048x7x7"]


def layers(c: int, b: int) -> dict[str, nn.Module]:
    return {
        "nn.BatchNorm2d": nn.BatchNorm2d(c),
        f"mabn.BatchNorm2d (b={b})": mabn.BatchNorm2d(c, norm_batch_size=b),
        f"BatchRenorm2d (b={b})": mabn.BatchRenorm2d(c, norm_batch_size=b, renorm_warmup_iters=0),
        f"ModifiedBatchNorm2d (b={b})": mabn.ModifiedBatchNorm2d(c, norm_batch_size=b),
        f"MABN2d (b={b})": mabn.MABN2d(c, norm_batch_size=b, renorm_warmup_iters=0),
    }


def fwd_bwd(mod: nn.Module, x: torch.Tensor, up: torch.Tensor):
    """One forward+backward of ``mod`` on a fresh leaf copy of ``x`` (a callable for timing)."""
    def run():
        mod(x.detach().requires_grad_()).backward(up)
    return run


def bench_shape(shape: str, args, device) -> tuple[dict[str, float], dict[str, float]]:
    """({layer: median seconds per forward+backward}, {layer: first-call seconds} (compile only))."""
    n, c, h, w = (int(v) for v in shape.split("x"))
    mods = {k: m.to(device) for k, m in layers(c, args.norm_batch_size).items()}
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, device=device).to(memory_format=fmt)
    up = torch.randn_like(x)
    first = {}
    if args.compile:
        torch._dynamo.reset()  # each shape compiles afresh (and stays within the recompile limit)
        mods = {k: compiling.compile_module(m) for k, m in mods.items()}
        first = {k: bench.timed(fwd_bwd(m, x, up), device) for k, m in mods.items()}
    times = bench.round_robin({k: fwd_bwd(m, x, up) for k, m in mods.items()}, args.repeats, args.warmup, device)
    return {k: statistics.median(ts) for k, ts in times.items()}, first


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (exit 2 when there is no GPU)")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="NxCxHxW shapes")
    p.add_argument("--norm-batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="compile every layer (torch.compile); the compile time is reported separately")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", help="also write the markdown table to this file")
    bench.add_allocator_argument(p)
    bench.add_kernels_argument(p)
    args = p.parse_args(argv)
    bench.apply_allocator(p, args)
    bench.apply_kernels(args)
    try:
        device = bench.resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.compile and (reason := compiling.unavailable_reason(device.type)):
        p.error(f"--compile: torch.compile cannot run on this machine: {reason}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    header, rows, compile_rows = ["shape"], [], []
    for shape in args.shapes:
        med, first = bench_shape(shape, args, device)
        base = med["nn.BatchNorm2d"]
        if len(header) == 1:
            header += [f"{k} ms (x BN)" for k in med]
        rows.append([shape] + [f"{1e3 * t:.1f} ({t / base:.2f}x)" for t in med.values()])
        print(" | ".join(rows[-1]), flush=True)
        if first:
            compile_rows.append([shape] + [f"{t:.1f}" for t in first.values()])

    cmd = "python scripts/bench_norm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    kind = "compiled (torch.compile, each layer separately) " if args.compile else ""
    lines = [
        f"Forward+backward of {kind}layers, median of {args.repeats} round-robin repeats, ratio to "
        f"{'compiled ' if args.compile else ''}nn.BatchNorm2d in parentheses.",
        "",
        f"- command: `{cmd.strip()}`",
        f"- device: {bench.machine_description(device)}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; load average "
        f"(1, 5, 15 min) at the end: {bench.load_average()}",
        f"- layout: {'channels_last' if args.channels_last else 'NCHW contiguous'}, float32",
    ]
    if args.compile and (bad := compiling.miscompiled_reason("mabn")):
        lines.append(f"- note: timing only; {bad}")
    lines += [
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ] + ["| " + " | ".join(r) + " |" for r in rows]
    if compile_rows:
        lines += ["", "Compilation: seconds of the first forward+backward of each compiled layer (not in "
                  "the medians above).", "",
                  "| shape | " + " | ".join(f"{k} s" for k in header[1:]).replace(" ms (x BN)", "") + " |",
                  "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in compile_rows]
    bench.write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
