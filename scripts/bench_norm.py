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
import torchvision
from torch import nn

import mabn
from mabn.engine import compiling
from mabn.lab import bench

SHAPES = ["32x256x56x56", "32x512x28x28", "32x1024x14x14", "32x2048x7x7"]

#: --presets choices: the mabn layers timed against nn.BatchNorm2d (which is always timed).
PRESETS = {
    "batchnorm": lambda c, b: (f"mabn.BatchNorm2d (b={b})", mabn.BatchNorm2d(c, norm_batch_size=b)),
    "brn": lambda c, b: (f"BatchRenorm2d (b={b})", mabn.BatchRenorm2d(c, norm_batch_size=b, renorm_warmup_iters=0)),
    "modified": lambda c, b: (f"ModifiedBatchNorm2d (b={b})", mabn.ModifiedBatchNorm2d(c, norm_batch_size=b)),
    "mabn": lambda c, b: (f"MABN2d (b={b})", mabn.MABN2d(c, norm_batch_size=b, renorm_warmup_iters=0)),
}


def layers(c: int, b: int, presets=tuple(PRESETS)) -> dict[str, nn.Module]:
    return {"nn.BatchNorm2d": nn.BatchNorm2d(c), **dict(PRESETS[p](c, b) for p in presets)}


def network_shapes(arch: str, batch: int, image_size: int) -> dict[str, int]:
    """{"NxCxHxW": how many of the torchvision network's BatchNorm2d layers see that input shape}
    in a training step at ``batch`` images of ``image_size`` px, found by running the network
    (one image) with forward hooks on its BatchNorm2d layers."""
    model = getattr(torchvision.models, arch)()
    counts: dict[str, int] = {}

    def hook(module, inputs):
        _, c, h, w = inputs[0].shape
        key = f"{batch}x{c}x{h}x{w}"
        counts[key] = counts.get(key, 0) + 1

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(hook)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    return counts


def fwd_bwd(mod: nn.Module, x: torch.Tensor, up: torch.Tensor):
    """One forward+backward of ``mod`` on a fresh leaf copy of ``x`` (a callable for timing)."""
    def run():
        mod(x.detach().requires_grad_()).backward(up)
    return run


def bench_shape(shape: str, args, device) -> tuple[dict[str, float], dict[str, float]]:
    """({layer: median seconds per forward+backward}, {layer: first-call seconds} (compile only))."""
    n, c, h, w = (int(v) for v in shape.split("x"))
    mods = {k: m.to(device) for k, m in layers(c, args.norm_batch_size, args.presets).items()}
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (exit 2 when there is no GPU)")
    p.add_argument("--shapes", nargs="+", default=None, help=f"NxCxHxW shapes (default: {' '.join(SHAPES)})")
    p.add_argument("--network", choices=["resnet50", "resnet18"],
                   help="time every distinct input shape of the torchvision network's BatchNorm2d layers "
                        "(--batch images of --image-size px) instead of --shapes, and add the per-step "
                        "total: the sum over all its normalization layers")
    p.add_argument("--batch", type=int, default=32, help="images per step with --network")
    p.add_argument("--image-size", type=int, default=224, help="input px with --network")
    p.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS),
                   help="mabn layers to time against nn.BatchNorm2d (default: all)")
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
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, torch.device, dict[str, int] | None, list[str]]:
    """The command line, checked and applied (allocator, kernels, threads): the arguments, the
    device, with --network {shape: layers} (else None) and the shapes to time. A bad value is a
    command-line error (exit 2)."""
    p = build_parser()
    args, device = bench.parse_and_apply(p, argv)
    if args.compile and (reason := compiling.unavailable_reason(device.type)):
        p.error(f"--compile: torch.compile cannot run on this machine: {reason}")
    if args.network and args.shapes:
        p.error("--network and --shapes: give one of them")
    bench.require_positive(p, args, "batch", "image_size", "norm_batch_size", "repeats")
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = network_shapes(args.network, args.batch, args.image_size) if args.network else None
    shapes = list(counts) if counts else (args.shapes or SHAPES)
    bench.require_shapes(p, shapes, args.norm_batch_size)
    return args, device, counts, shapes


def time_shapes(args, device, shapes: list[str], counts: dict[str, int] | None) -> dict:
    """Times every shape, printing each table row when it is done: "header" and "rows" of the
    table (with --network, the per-step total last), "names" (the layers, in column order) and
    "compile_rows" (the first-call seconds, with --compile)."""
    header, rows, compile_rows = ["shape"] + (["layers"] if counts else []), [], []
    total: dict[str, float] = {}
    for shape in shapes:
        med, first = bench_shape(shape, args, device)
        base = med["nn.BatchNorm2d"]
        names = list(med)
        if len(header) <= 2:
            header += [f"{k} ms (x BN)" for k in names]
        rows.append([shape] + ([str(counts[shape])] if counts else [])
                    + [f"{1e3 * t:.2f} ({t / base:.2f}x)" for t in med.values()])
        print(" | ".join(rows[-1]), flush=True)
        if counts:
            for k, t in med.items():
                total[k] = total.get(k, 0.0) + counts[shape] * t
        if first:
            compile_rows.append([shape] + [f"{t:.1f}" for t in first.values()])
    if counts:
        base = total["nn.BatchNorm2d"]
        rows.append([f"**per step** ({args.network}, batch {args.batch}, {args.image_size} px)",
                     str(sum(counts.values()))] + [f"**{1e3 * t:.1f}** ({t / base:.2f}x)" for t in total.values()])
        print(" | ".join(rows[-1]), flush=True)
    return {"header": header, "rows": rows, "names": names, "compile_rows": compile_rows}


def report_lines(args, argv, device, counts: dict[str, int] | None, table: dict) -> list[str]:
    """The markdown report: what was timed, the command and the machine, then the tables."""
    cmd = "python scripts/bench_norm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    kind = "compiled (torch.compile, each layer separately) " if args.compile else ""
    header, names = table["header"], table["names"]
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
    if counts:
        lines.append(f"- shapes: every distinct input of torchvision {args.network}'s BatchNorm2d layers in a "
                     f"training step; layers = how many see it; per step = the sum over all of them "
                     f"(count x median), i.e. the normalization layers' share of one training step")
    if args.compile and (bad := compiling.miscompiled_reason("batchstat")):
        lines.append(f"- note: timing only; {bad}")
    lines += [
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ] + ["| " + " | ".join(r) + " |" for r in table["rows"]]
    if table["compile_rows"]:
        lines += ["", "Compilation: seconds of the first forward+backward of each compiled layer (not in "
                  "the medians above).", "",
                  "| shape | " + " | ".join(f"{k} s" for k in names) + " |",
                  "|" + "---|" * (1 + len(names))] + ["| " + " | ".join(r) + " |" for r in table["compile_rows"]]
    return lines


def main(argv=None):
    args, device, counts, shapes = parse_args(argv)
    torch.manual_seed(0)
    table = time_shapes(args, device, shapes, counts)
    bench.write_report("\n".join(report_lines(args, argv, device, counts, table)) + "\n", args.out)


if __name__ == "__main__":
    main()
