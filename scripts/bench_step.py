#!/usr/bin/env python
"""Training-step time of a torchvision ResNet-50: stock nn.BatchNorm2d against MABN, eager and
compiled, NCHW and channels_last.

One step = zero_grad, forward, cross-entropy, backward and an SGD step (momentum 0.9, weight
decay 1e-4) on a fixed random batch. The two networks are the trainer's own
(mabn.engine.models.build_model with the norm presets configs/norm/torch_bn.yaml, i.e.
nn.BatchNorm2d, and configs/norm/mabn.yaml: MABN2d in groups of --norm-batch-size images with
weight-centralized convolutions), ImageNet stem, 1000 classes. Each (layout, mode, network) is its
own model instance; "compiled" wraps it in torch.compile exactly as the trainer's compile=true
(mabn.engine.compiling.compile_module). Every configuration first runs one step that is not
timed: for a compiled one that step compiles, and its time is reported separately as the compile
time. Then --warmup untimed and --iters timed rounds run round-robin (one step of every
configuration per round, so that noise from other processes hits all alike; the order is reversed
every other round, so that BN and MABN each run first in half the rounds); the table gives the
median step time, its spread and the ratio MABN / BN within each layout and mode.

    python scripts/bench_step.py --out results/speed.md            # batch 32, 224 px: the figures
    python scripts/bench_step.py --image-size 64 --iters 2 --warmup 0 --modes eager   # a quick look

Run time on 2 CPU cores: a ResNet-50 step at batch 32 and 224 px takes roughly 40-90 s (about
batch x image_size^2: 2-3 s at batch 8 and 64 px), and compiling takes ~2.5-3 min for the BN
network and ~7.5-9 min for MABN (on 2 cores shared with other jobs; independent of the input
size). So the defaults (8 configurations x (1 + 1 warm-up + 3 timed) steps, 4 compilations)
take about 1-1.5 h; ``--image-size 64 --batch 8 --iters 2 --warmup 0`` about 23 min, nearly all
of it compiling. On a GPU (--device cuda) the whole run takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from mabn.engine import compiling, config, files, models
from mabn.lab import bench

NORM_PRESETS = Path(__file__).resolve().parent.parent / "configs" / "norm"
#: name in the tables: (norm preset configs/norm/<preset>.yaml, weight_centralization override or None).
#: BN+WC (with --bn-wc) is BN with MABN's weight-centralized convolutions: it splits MABN's step
#: cost into the convolutions' share (BN+WC / BN) and the normalization layers' (MABN / BN+WC).
NETWORKS = {"BN": ("torch_bn", None), "MABN": ("mabn", None), "BN+WC": ("torch_bn", True)}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("eager", "compiled")


def norm_config(preset: str, norm_batch_size: int | None, weight_centralization: bool | None = None):
    """The trainer's norm config of ``configs/norm/<preset>.yaml``: a preset that normalizes in
    groups (MABN) gets groups of ``norm_batch_size`` images, one over the whole batch (BN) keeps
    it; weight_centralization is overridden unless None."""
    cfg = OmegaConf.merge(OmegaConf.structured(config.NormConfig), OmegaConf.load(NORM_PRESETS / f"{preset}.yaml"))
    if cfg.norm_batch_size is not None:
        cfg.norm_batch_size = norm_batch_size
    if weight_centralization is not None:
        cfg.weight_centralization = weight_centralization
    return cfg


def build(network: str, arch: str, norm_batch_size: int, device, layout) -> nn.Module:
    """A fresh ResNet with the normalization of ``network`` (BN or MABN), on ``device``."""
    model_cfg = OmegaConf.structured(config.ModelConfig(arch=arch, small_input=False))
    preset, weight_centralization = NETWORKS[network]
    model = models.build_model(model_cfg, norm_config(preset, norm_batch_size, weight_centralization), 1000)
    return model.to(device).to(memory_format=layout).train()


def make_step(model: nn.Module, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A callable running one SGD training step of ``net`` (``model`` or its compiled wrapper)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
    return step


def graph_breaks() -> int:
    """Graph breaks torch.compile has met so far in this process."""
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values())


def paired(times, key, num, den) -> tuple[float, float, float]:
    """(median, mean, standard error) over rounds of network ``num``'s step / ``den``'s."""
    ratios = [a / b for a, b in zip(times[key(num)], times[key(den)])]
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    return statistics.median(ratios), statistics.mean(ratios), se


def header_lines(args, command, started, wall, load_start, device) -> list[str]:
    """The report's title and the run's description: command, date, machine, load, step, timing."""
    return [f"# {args.arch} training step: MABN against nn.BatchNorm2d\n",
            f"- Command: `{command}`",
            f"- Date: {started:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min",
            f"- Machine: {bench.machine_description(device)}",
            f"- Load average (1, 5, 15 min) at start: {load_start}; at end: {bench.load_average()} "
            f"(other processes on the machine slow the steps down; see the spread column)",
            f"- Step: batch {args.batch}, {args.image_size}x{args.image_size} px, float32, forward + "
            f"cross-entropy + backward + SGD (momentum 0.9, weight decay 1e-4). BN = torchvision's "
            f"nn.BatchNorm2d over the whole batch (configs/norm/torch_bn.yaml); MABN = configs/norm/mabn.yaml "
            f"(MABN2d, groups of {args.norm_batch_size} images, weight-centralized convolutions)"
            + ("; BN+WC = BN with weight-centralized convolutions." if args.bn_wc else "."),
            f"- Timing: {args.warmup} warm-up + {args.iters} timed round-robin rounds (order reversed in every "
            f"other round) after one untimed first step per configuration; median step time; spread = (max - min) / median over the "
            f"timed steps. Paired = MABN's step over BN's step of the same round (the two run one after "
            f"the other, so slow phases of the machine hit both): median over rounds, and the mean with "
            f"its standard error (sample std / sqrt(rounds)). Compile = the first step of a compiled "
            f"configuration (compilation included).",
            ""]


def step_table_lines(args, first, times) -> list[str]:
    """The main table: per layout and mode, BN's and MABN's step, their ratios, spreads, compile times."""
    networks = networks_of(args)
    L = ["| layout | mode | BN step (ms) | MABN step (ms) | MABN / BN | paired: median | paired: mean ± s.e. | "
         "BN spread | MABN spread | BN compile (s) | MABN compile (s) |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for layout in args.layouts:
        for mode in args.modes:
            key = lambda net: (layout, mode, net)  # noqa: E731
            med = {n: statistics.median(times[key(n)]) for n in networks}
            comp = {n: f"{first[key(n)]:.1f}" if mode == "compiled" else "-" for n in networks}
            p_med, p_mean, se = paired(times, key, "MABN", "BN")
            L.append(f"| {layout} | {mode} | {1e3 * med['BN']:.1f} | {1e3 * med['MABN']:.1f} | "
                     f"{med['MABN'] / med['BN']:.3f} | {p_med:.3f} | "
                     f"{p_mean:.3f} ± {se:.3f} | {bench.spread(times[key('BN')]):.0f}% | "
                     f"{bench.spread(times[key('MABN')]):.0f}% | {comp['BN']} | {comp['MABN']} |")
    return L


def split_table_lines(args, times) -> list[str]:
    """With --bn-wc: MABN's step split into the convolutions' share (BN+WC / BN) and the
    normalization layers' (MABN / BN+WC); without it, nothing."""
    if "BN+WC" not in networks_of(args):
        return []
    L = ["", "Split by BN+WC (BN with MABN's weight-centralized convolutions), paired by round "
         "(median; mean ± s.e.): the convolutions' share BN+WC / BN and the normalization layers' "
         "share MABN / BN+WC.", "",
         "| layout | mode | BN+WC step (ms) | BN+WC / BN: median | mean ± s.e. | MABN / BN+WC: median | mean ± s.e. |",
         "|---|---|---:|---:|---:|---:|---:|"]
    for layout in args.layouts:
        for mode in args.modes:
            key = lambda net: (layout, mode, net)  # noqa: E731
            wc, norm = paired(times, key, "BN+WC", "BN"), paired(times, key, "MABN", "BN+WC")
            L.append(f"| {layout} | {mode} | {1e3 * statistics.median(times[key('BN+WC')]):.1f} | "
                     f"{wc[0]:.3f} | {wc[1]:.3f} ± {wc[2]:.3f} | {norm[0]:.3f} | {norm[1]:.3f} ± {norm[2]:.3f} |")
    return L


def rounds_lines(args, times, breaks) -> list[str]:
    """Every timed step, round by round; with compiled modes, the graph breaks met."""
    networks = networks_of(args)
    keys = [(layout, mode, net) for layout in args.layouts for mode in args.modes for net in networks]
    L = ["", "Every timed step (ms), round by round:", "",
         "| round | " + " | ".join(" ".join(k) for k in keys) + " |", "|---:|" + "---:|" * len(keys)]
    for r in range(len(times[keys[0]])):
        L.append(f"| {r + 1} | " + " | ".join(f"{1e3 * times[k][r]:.1f}" for k in keys) + " |")
    if "compiled" in args.modes:
        L += ["", "Graph breaks met by torch.compile (0 = each network compiled as whole graphs): "
              + ", ".join(f"{layout} {net}: {breaks[(layout, net)]}" for layout in args.layouts for net in networks)]
        if bad := compiling.miscompiled_reason("batchstat"):
            L += ["", f"Note: the compiled MABN figures are timings only: {bad}."]
    return L


def render(args, command, first, times, breaks, started, wall, load_start, device) -> str:
    """The markdown report of one run."""
    L = (header_lines(args, command, started, wall, load_start, device) + step_table_lines(args, first, times)
         + split_table_lines(args, times) + rounds_lines(args, times, breaks))
    return "\n".join(L) + "\n"


def networks_of(args) -> list[str]:
    """The networks a run times, in round-robin order."""
    return ["BN", "MABN"] + (["BN+WC"] if args.bn_wc else [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for the method and the expected run time.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (exit 2 when there is no GPU)")
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"],
                   help="torchvision ResNet (resnet18 only for a quick look)")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--image-size", type=int, default=224, help="input height = width in pixels")
    p.add_argument("--norm-batch-size", type=int, default=2, help="images per MABN normalization group")
    p.add_argument("--iters", type=int, default=3, help="timed rounds (one step of every configuration each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first step")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--bn-wc", action="store_true",
                   help="also time BN with weight-centralized convolutions (BN+WC), and split MABN's "
                        "step cost into the convolutions' and the normalization layers' shares")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    bench.add_allocator_argument(p)
    bench.add_kernels_argument(p)
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, torch.device]:
    """The command line, checked and applied (allocator, kernels, threads): the arguments and the
    device. A bad value is a command-line error (exit 2)."""
    p = build_parser()
    args, device = bench.parse_and_apply(p, argv)
    bench.require_positive(p, args, "batch", "image_size", "norm_batch_size", "iters")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be >= 0")
    if args.batch % args.norm_batch_size:
        p.error(f"--batch={args.batch} is not divisible by --norm-batch-size={args.norm_batch_size}")
    if args.image_size < 32:
        p.error(f"--image-size={args.image_size} must be >= 32 (the ResNet reduces it 32-fold)")
    if "compiled" in args.modes and (reason := compiling.unavailable_reason(device.type)):
        p.error(f"--modes compiled: torch.compile cannot run on this machine: {reason}; use --modes eager")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, device


def first_steps(args, device, log) -> tuple[dict, dict, dict]:
    """Builds every (layout, mode, network) and runs its first, untimed step: ({key: step
    callable}, {key: seconds of the first step (compiled: the compilation)}, {(layout, network):
    graph breaks of the compiled network})."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    steps, first, breaks = {}, {}, {}
    for layout in args.layouts:
        x = x0.to(device).contiguous(memory_format=LAYOUTS[layout])
        for mode in args.modes:
            for net in networks_of(args):
                torch.manual_seed(0)
                model = build(net, args.arch, args.norm_batch_size, device, LAYOUTS[layout])
                before = graph_breaks()
                wrapped = compiling.compile_module(model) if mode == "compiled" else model
                key = (layout, mode, net)
                steps[key] = make_step(model, wrapped, x, y)
                log(f"first step {layout} {mode} {net} ...")
                first[key] = bench.timed(steps[key], device)
                if mode == "compiled":
                    breaks[(layout, net)] = graph_breaks() - before
                log(f"  {first[key]:.1f} s")
    return steps, first, breaks


def write_atomically(text: str, path: str) -> None:
    """Write ``path`` through a temporary file renamed over it (no half-written report)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write({path: text})


def main(argv=None):
    args, device = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started, t_start, load_start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter(), bench.load_average()
    command = "python scripts/bench_step.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    steps, first, breaks = first_steps(args, device, log)

    def progress(r, last):
        log(f"round {r}/{args.iters}: " + ", ".join(f"{' '.join(k)} {1e3 * t:.0f} ms" for k, t in last.items()))

    times = bench.round_robin(steps, args.iters, args.warmup, device, progress)
    report = render(args, command, first, times, breaks, started, time.perf_counter() - t_start, load_start, device)
    print(report)
    if args.out:
        write_atomically(report, args.out)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
