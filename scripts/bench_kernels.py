#!/usr/bin/env python
"""Time of each of mabn's C++ CPU kernels (mabn.kernels) against nn.BatchNorm2d's own ATen calls.

For every shape, in one layout, the calls one MABN2d forward+backward makes on the full-size
tensors are timed one by one, round-robin with torch's BatchNorm forward and backward kernels on
the same tensors and a plain copy (the memory-bandwidth yardstick):

* ``sums(x, x)``: the forward's per-(group, channel) sums (column_dot_sums in channels_last,
  row_dot_sums of the (N*C, H*W) planes in NCHW);
* ``sums(dout, x)``: the backward's two reductions;
* ``scale_shift``: the forward's output ``x * scale + offset``;
* ``multiply_adds``: eq. 20's input gradient ``dout * a + x * b``;
* ``bn forward`` / ``bn backward``: ``aten::native_batch_norm`` (training) and
  ``aten::native_batch_norm_backward`` (input, weight and bias gradients);
* ``copy``: ``out.copy_(x)``.

The layer's total (``bench_norm.py``) minus the four kernels is what the layer spends outside
them: the statistics between the passes, its autograd Function and the small operations around
the kernels (eager float32 CPU layers run all of it in one C++ call per pass direction,
the "cpp_layer" backend of mabn.backends; the kernels are timed here as that layer calls them).

    python scripts/bench_kernels.py --channels-last --threads 2 --allocator keep
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch

from mabn import kernels
from mabn.lab import bench

SHAPES = ["32x256x56x56", "32x512x28x28", "32x1024x14x14", "32x2048x7x7", "32x512x7x7"]


def calls(shape: str, channels_last: bool, norm_batch_size: int) -> dict:
    """{name: callable} for one shape (see the module docstring)."""
    ext = kernels.load()
    n, c, h, w = (int(v) for v in shape.split("x"))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=fmt)
    d = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=fmt)
    groups = n // norm_batch_size
    a, b = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    zero = torch.empty(0)
    out = torch.empty_like(x)
    if channels_last:
        def rows(t):
            return t.permute(0, 2, 3, 1).reshape(n, h * w, c)

        def sums(p, q):
            return ext.column_dot_sums(rows(p).reshape(groups, -1, c), rows(q).reshape(groups, -1, c))
    else:
        def rows(t):
            return t.view(n, c, h * w)

        def sums(p, q):
            return ext.row_dot_sums(p.view(n * c, h * w), q.view(n * c, h * w))
    rx, rd, rout = rows(x), rows(d), rows(out)
    stream = kernels.stream(out)
    weight, bias = torch.ones(c), torch.zeros(c)
    _, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5)
    return {
        "sums(x, x)": lambda: sums(x, x),
        "sums(dout, x)": lambda: sums(d, x),
        "scale_shift": lambda: ext.scale_shift(rx, a, zero, channels_last, stream, rout),
        "multiply_adds": lambda: ext.multiply_adds(rd, rx, a, b, zero, channels_last, stream, rout),
        "bn forward": lambda: torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5),
        "bn backward": lambda: torch.ops.aten.native_batch_norm_backward(
            d, x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True]),
        "copy": lambda: out.copy_(x),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="NxCxHxW shapes")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--norm-batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=51)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", help="also write the markdown table to this file")
    bench.add_allocator_argument(p)
    args = p.parse_args(argv)
    bench.apply_allocator(p, args)
    bench.require_positive(p, args, "norm_batch_size", "repeats")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be >= 0")
    bench.require_shapes(p, args.shapes, args.norm_batch_size)
    if kernels.MODE == "off":
        p.error("mabn.kernels.MODE is off (MABN_CPU_KERNELS=off): there are no kernels to time")
    if args.threads:
        torch.set_num_threads(args.threads)
    if kernels.load() is None:
        print("mabn's C++ kernels could not be built on this machine (see the warning above)", file=sys.stderr)
        return 2

    header = None
    rows = []
    for shape in args.shapes:
        fns = calls(shape, args.channels_last, args.norm_batch_size)
        times = bench.round_robin(fns, args.repeats, args.warmup, torch.device("cpu"))
        med = {k: statistics.median(v) for k, v in times.items()}
        kernel_total = sum(med[k] for k in ("sums(x, x)", "sums(dout, x)", "scale_shift", "multiply_adds"))
        bn_total = med["bn forward"] + med["bn backward"]
        header = header or (["shape"] + [f"{k} ms" for k in med] + ["mabn kernels ms", "BN calls ms", "kernels / BN"])
        rows.append([shape] + [f"{1e3 * v:.3f}" for v in med.values()]
                    + [f"{1e3 * kernel_total:.3f}", f"{1e3 * bn_total:.3f}", f"{kernel_total / bn_total:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)

    cmd = "python scripts/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "mabn's CPU kernels, one call each, against nn.BatchNorm2d's ATen forward and backward on the "
        f"same tensors; median of {args.repeats} round-robin repeats.",
        "",
        f"- command: `{cmd.strip()}`",
        f"- device: {bench.machine_description(torch.device('cpu'))}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; load average "
        f"(1, 5, 15 min) at the end: {bench.load_average()}",
        f"- layout: {'channels_last' if args.channels_last else 'NCHW contiguous'}, float32; "
        f"groups of {args.norm_batch_size}; streaming stores for outputs of >= {kernels.STREAM_BYTES} bytes",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ] + ["| " + " | ".join(r) + " |" for r in rows]
    bench.write_report("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
