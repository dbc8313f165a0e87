#!/usr/bin/env python
"""Forward+backward time of the mabn presets against nn.BatchNorm2d at ResNet-50 shapes.

Every layer is timed on the same input and upstream gradient, round-robin (one repeat of each in
turn, so that machine noise hits all of them alike); the table reports the median time per
forward+backward and its ratio to nn.BatchNorm2d measured in the same run.

    python scripts/bench_norm.py                       # CPU, all four shapes
    python scripts/bench_norm.py --device cuda --out results/bench_norm_cuda.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import mabn

SHAPES = ["32x256x56x56", "32x512x28x28", "32x1024x14x14", "32x2048x7x7"]


def layers(c: int, b: int) -> dict[str, nn.Module]:
    return {
        "nn.BatchNorm2d": nn.BatchNorm2d(c),
        f"mabn.BatchNorm2d (b={b})": mabn.BatchNorm2d(c, norm_batch_size=b),
        f"BatchRenorm2d (b={b})": mabn.BatchRenorm2d(c, norm_batch_size=b, renorm_warmup_iters=0),
        f"ModifiedBatchNorm2d (b={b})": mabn.ModifiedBatchNorm2d(c, norm_batch_size=b),
        f"MABN2d (b={b})": mabn.MABN2d(c, norm_batch_size=b, renorm_warmup_iters=0),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_layers(mods, x, up, repeats, warmup, device):
    times = {name: [] for name in mods}
    for rep in range(warmup + repeats):
        for name, mod in mods.items():
            xi = x.detach().requires_grad_()
            sync(device)
            t0 = time.perf_counter()
            y = mod(xi)
            y.backward(up)
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="NxCxHxW shapes")
    p.add_argument("--norm-batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    header = ["shape"]
    rows = []
    for shape in args.shapes:
        n, c, h, w = (int(v) for v in shape.split("x"))
        mods = {k: m.to(device) for k, m in layers(c, args.norm_batch_size).items()}
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        x = torch.randn(n, c, h, w, device=device).to(memory_format=fmt)
        up = torch.randn_like(x)
        med = time_layers(mods, x, up, args.repeats, args.warmup, device)
        base = med["nn.BatchNorm2d"]
        if len(header) == 1:
            header += [f"{k} ms (x BN)" for k in med]
        rows.append([shape] + [f"{1e3 * t:.1f} ({t / base:.2f}x)" for t in med.values()])
        print(" | ".join(rows[-1]), flush=True)

    cmd = "python scripts/bench_norm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Forward+backward, median of {args.repeats} round-robin repeats, ratio to nn.BatchNorm2d in "
        f"parentheses.",
        "",
        f"- command: `{cmd.strip()}`",
        f"- device: {machine(device)}; torch {torch.__version__}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- layout: {'channels_last' if args.channels_last else 'NCHW contiguous'}, float32",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
