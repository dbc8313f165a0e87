#!/usr/bin/env python
"""Inference/training cost of normalizations in a ResNet: Figure 1(a) and Table 9 of the paper.

Measures, in one run and with interleaved repeats (so that machine noise hits every model alike):

* inference images/s at each batch size (default 1 and 32) on CPU and, when present, CUDA, for
  ResNet-50 with
    - BN, folded into the convolutions (``mabn.fold.fold_model``),
    - MABN (MABN2d + CenConv2d, eq. 18/19), folded: the same graph as folded BN,
    - BN unfolded (eval-mode nn.BatchNorm2d, for reference),
    - GroupNorm (32 groups), InstanceNorm (nn.InstanceNorm2d, affine) and LayerNorm, taken as
      GroupNorm(1, C): normalization over (C, H, W) of each sample with a per-channel affine,
      the usual conv-net analogue of LayerNorm;
  with the ratio of each to folded BN;
* FLOPs per image (torch.utils.flop_counter.FlopCounterMode, which counts convolutions and
  matmuls as 2 FLOPs per multiply-add and does not count normalization arithmetic, so the number
  of activation elements that still go through a normalization at inference is shown next to it)
  and parameter counts (trained model and inference model);
* training iterations/s and peak memory for BN, GN and MABN: each (model, repeat) runs in a fresh
  subprocess so that the peak is its own: process peak RSS (``resource.getrusage``) on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA. One iteration = forward, cross-entropy, backward and
  an SGD step on random data.

Examples:
    python scripts/bench_inference.py --out results/inference.md          # ResNet-50, all defaults
    python scripts/bench_inference.py --repeats 3 --train-repeats 1      # ResNet-50, shorter
    python scripts/bench_inference.py --arch resnet18 --repeats 2 --train-repeats 1   # quick look

Run time on 2 CPU cores: ResNet-50 at batch 32 takes ~4-7 s per forward and ~10 s per training
iteration at batch 8, so the defaults (5 inference repeats, 3 training repeats of 1 warm-up + 2
timed iterations, each in a fresh process) take ~6-7 min on idle cores and up to ~12 min on cores
shared with other jobs; ``--repeats 3 --train-repeats 1`` about 6 min on shared ones.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mabn import BatchStatNorm2d, MABN2d, convert_model
from mabn.fold import fold_model
from mabn.lab import bench

# The authors' released code reports inference iterations/s of ResNet-50 (Figure 1(a) numbers);
# Table 9 (Mask R-CNN backbone, one 224x224 image): BN 12.73, GN 6.34, MABN 12.73 iter/s.
OFFICIAL_FIG1 = {"BN (folded)": 237.88, "MABN (folded)": 237.88, "GN": 99.37, "IN": 105.60, "LN": 125.44}
PAPER_TABLE9 = {"BN": (3123.75, 58.875, 2.35, 12.73), "GN": (3183.28, 58.859, 2.22, 6.34),
                "MABN": (3123.75, 60.609, 1.81, 12.73)}

INFERENCE_MODELS = ("BN (folded)", "MABN (folded)", "BN (unfolded)", "GN", "IN", "LN")
TRAIN_MODELS = ("BN", "GN", "MABN")


# ---------------------------------------------------------------------------------- models
def build_model(name: str, arch: str, norm_batch_size: int | None = None) -> nn.Module:
    """The trainable model of a benchmark entry (BN/MABN names with or without " (folded)")."""
    ctor = getattr(torchvision.models, arch)
    base = name.split(" ")[0]
    if base == "BN":
        return ctor()
    if base == "MABN":
        model = ctor(norm_layer=lambda c: MABN2d(c, norm_batch_size=norm_batch_size))
        return convert_model(model, norm=None, weight_centralization=True)  # CenConv2d (eq. 18)
    if base == "GN":
        return ctor(norm_layer=lambda c: nn.GroupNorm(32, c))
    if base == "IN":
        return ctor(norm_layer=lambda c: nn.InstanceNorm2d(c, affine=True))
    if base == "LN":
        return ctor(norm_layer=lambda c: nn.GroupNorm(1, c))
    raise ValueError(name)


def inference_model(name: str, arch: str) -> nn.Module:
    model = build_model(name, arch).eval()
    return fold_model(model) if name.endswith("(folded)") else model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, image_size: int) -> float:
    """FLOPs of one forward of one image, as FlopCounterMode counts them."""
    x = torch.randn(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return float(counter.get_total_flops())


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def normalized_elements_per_image(model: nn.Module, image_size: int) -> int:
    """Activation elements that pass through a (non-folded) normalization layer, per image."""
    total = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel()))
             for m in model.modules() if isinstance(m, _NORM_TYPES + (BatchStatNorm2d,))]
    with torch.inference_mode():
        model(torch.randn(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return total[0]


def graph_signature(model: nn.Module):
    return [(n, type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
            for n, m in model.named_modules()]


# ---------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    """Seconds for ``iters`` forwards."""
    _sync(x.device.type)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(iters):
            model(x)
    _sync(x.device.type)
    return time.perf_counter() - t0


def bench_inference(names, arch, device, batch, image_size, repeats, min_time, log):
    """{name: [images/s per repeat]}, repeats interleaved across models (order rotated)."""
    models = {n: inference_model(n, arch).to(device) for n in names}
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    iters = {}
    for n, m in models.items():  # warm-up, and calibrate iterations per measurement
        time_forward(m, x, 1)
        t = time_forward(m, x, 1)
        iters[n] = max(1, round(min_time / max(t, 1e-6)))
    samples = {n: [] for n in names}
    order = list(names)
    for r in range(repeats):
        for n in order:
            s = time_forward(models[n], x, iters[n])
            samples[n].append(batch * iters[n] / s)
        order = order[1:] + order[:1]
        log(f"  {device} batch {batch} repeat {r + 1}/{repeats}: "
            + ", ".join(f"{n} {samples[n][-1]:.1f}" for n in names))
    return samples


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM on Linux (per address space, so it starts
    afresh at exec, unlike ru_maxrss which Linux carries over from the parent), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def train_worker(args) -> None:
    """One training measurement in this (fresh) process; prints a JSON line."""
    torch.manual_seed(0)
    device = args.device
    model = build_model(args._train_worker, args.arch, args.norm_batch_size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.train_batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.train_batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    rss_before = _peak_rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (allocates gradients and optimizer state)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.train_iters):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    out = {"its": args.train_iters / elapsed, "rss_peak": _peak_rss_bytes(), "rss_before": rss_before}
    if device.startswith("cuda"):
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(out), flush=True)


def bench_training(args, device, log):
    results = {n: [] for n in TRAIN_MODELS}
    order = list(TRAIN_MODELS)
    for r in range(args.train_repeats):
        for n in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--_train-worker", n, "--arch", args.arch,
                   "--device", device, "--train-batch-size", str(args.train_batch_size),
                   "--image-size", str(args.image_size), "--train-iters", str(args.train_iters),
                   "--norm-batch-size", str(args.norm_batch_size), "--threads", str(torch.get_num_threads())]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"training worker {n} failed:\n{proc.stdout}\n{proc.stderr}")
            results[n].append(json.loads(lines[-1][len("RESULT "):]))
        order = order[1:] + order[:1]
        log(f"  {device} training repeat {r + 1}/{args.train_repeats}: "
            + ", ".join(f"{n} {results[n][-1]['its']:.3f} it/s" for n in TRAIN_MODELS))
    return results


# ---------------------------------------------------------------------------------- report
def machine_description() -> str:
    """bench.machine_description (CPU, threads, allocator, input-gradient path, GPU) plus the RAM,
    torchvision, Python and the OS."""
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f"{kb / 2**20:.0f} GiB RAM, "
    except (OSError, ValueError, IndexError):
        pass
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return (f"{bench.machine_description(device)}; {mem}torchvision {torchvision.__version__}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def header_lines(args, command: str, started, wall: float) -> list[str]:
    """The report's title and the run's description: command, date, machine, load, method."""
    L = [f"# Inference and training cost of normalizations ({args.arch}, Figure 1(a) / Table 9)\n",
         f"- Command: `{command}`",
         f"- Date: {started:%Y-%m-%d %H:%M} (local time), wall time {wall / 60:.1f} min",
         f"- Machine: {machine_description()}",
         f"- Load average (1, 5, 15 min) at start: {args.load_start}; at end: {bench.load_average()} "
         f"(other processes sharing the cores make timings noisy; see the spread columns)",
         f"- Input {args.image_size}x{args.image_size}, float32, NCHW, `torch.inference_mode()`; "
         f"{args.repeats} interleaved repeats per (device, batch) with the model order rotated, each "
         f"repeat at least {args.min_time:g} s of forwards. Throughput is the best repeat (the least "
         f"disturbed by other processes, as timeit advises) with the median beside it; spread = "
         f"(max - min) / median over repeats; ratios use the best repeats."]
    if args.note:
        L.append(f"- Note: {args.note}")
    return L + [""]


def inference_lines(inference: dict) -> list[str]:
    """One throughput table per (device, batch): each model's images/s and its ratio to folded BN."""
    L = []
    for (device, batch), samples in inference.items():
        L.append(f"## Inference throughput, {device}, batch {batch} (images/s)\n")
        L.append("| model | images/s (best) | images/s (median) | spread | ratio vs folded BN | "
                 "ratio of medians | official release ratio (Fig. 1(a) numbers) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        ref, ref_med = max(samples["BN (folded)"]), statistics.median(samples["BN (folded)"])
        for n, xs in samples.items():
            med = statistics.median(xs)
            off = OFFICIAL_FIG1.get(n)
            off_s = f"{off / OFFICIAL_FIG1['BN (folded)']:.3f}" if off else "-"
            L.append(f"| {n} | {max(xs):.2f} | {med:.2f} | {bench.spread(xs):.1f}% | {max(xs) / ref:.3f} | "
                     f"{med / ref_med:.3f} | {off_s} |")
        L.append("")
    return L


def cost_lines(costs: dict) -> list[str]:
    """The model cost table (parameters, FLOPs, normalized elements) and the same-graph check."""
    L = ["## Model cost (per image, inference model)\n",
         "| model | params, trained model (M) | params, inference model (M) | GFLOPs (FlopCounterMode) | "
         "activation elements normalized at inference (M) |",
         "|---|---:|---:|---:|---:|"]
    for n in INFERENCE_MODELS:
        s = costs[n]
        L.append(f"| {n} | {s['params'] / 1e6:.3f} | {s['params_inf'] / 1e6:.3f} | {s['flops'] / 1e9:.3f} | "
                 f"{s['norm_elems'] / 1e6:.2f} |")
    return L + ["", f"Folded MABN and folded BN have the same graph (module types, names and parameter shapes): "
                    f"**{'yes' if costs['same_graph'] else 'NO'}**.\n"]


def training_lines(args, training: dict) -> list[str]:
    """One training table per device: iterations/s, the ratio to BN and the peak memory."""
    L = []
    for device, res in training.items():
        L.append(f"## Training, {device}, batch {args.train_batch_size} "
                 f"(MABN normalization groups of {args.norm_batch_size})\n")
        mem_col = "peak CUDA memory allocated (GB)" if device.startswith("cuda") else "peak process RSS (GB)"
        L.append(f"| model | iterations/s (best) | iterations/s (median) | spread | ratio vs BN | {mem_col} | "
                 f"peak RSS - RSS before the first iteration (GB) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        ref = max(r["its"] for r in res["BN"])
        for n in TRAIN_MODELS:
            its = [r["its"] for r in res[n]]
            peak = max(r["cuda_peak"] if device.startswith("cuda") else r["rss_peak"] for r in res[n])
            inc = max(r["rss_peak"] - r["rss_before"] for r in res[n])
            L.append(f"| {n} | {max(its):.3f} | {statistics.median(its):.3f} | {bench.spread(its):.1f}% | "
                     f"{max(its) / ref:.3f} | {peak / 1e9:.3f} | {inc / 1e9:.3f} |")
        L.append("")
    return L


def table9_lines(args, costs: dict, inference: dict, training: dict) -> list[str]:
    """Table 9 in the paper's shape: FLOPs, training speed and memory (first trained device),
    inference speed at batch 1 (else the first batch measured), beside the paper's numbers."""
    dev0 = next(iter(training)) if training else None
    b1 = next(((d, b) for (d, b) in inference if b == 1), None) or next(iter(inference))
    L = [f"## Table 9 view ({args.arch}; paper: Mask R-CNN R-50-FPN backbone, 8 GPUs x 2 images)\n",
         f"| | GFLOPs | training it/s ({dev0}) | training memory (GB, {dev0}) | "
         f"inference images/s (best; {b1[0]}, batch {b1[1]}) | inference ratio vs BN | paper: FLOPs (M) | "
         f"paper: memory (GB) | paper: training it/s | paper: inference it/s (ratio) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    inf = inference[b1]
    inf_ref = max(inf["BN (folded)"])
    for n in TRAIN_MODELS:
        inf_name = {"BN": "BN (folded)", "MABN": "MABN (folded)", "GN": "GN"}[n]
        if dev0:
            res = training[dev0][n]
            its = f"{max(r['its'] for r in res):.3f}"
            key = "cuda_peak" if dev0.startswith("cuda") else "rss_peak"
            mem = f"{max(r[key] for r in res) / 1e9:.3f}"
        else:
            its = mem = "-"
        p = PAPER_TABLE9[n]
        med = max(inf[inf_name])
        L.append(f"| {n} | {costs[inf_name]['flops'] / 1e9:.3f} | {its} | {mem} | {med:.2f} | "
                 f"{med / inf_ref:.3f} | {p[0]} | {p[1]} | {p[2]} | {p[3]} ({p[3] / PAPER_TABLE9['BN'][3]:.3f}) |")
    return L + [""]


def headline_lines(inference: dict) -> list[str]:
    """Per (device, batch): folded MABN and GN against folded BN; then the notes on the method."""
    L = ["## Headline\n"]
    for (device, batch), samples in inference.items():
        ref = max(samples["BN (folded)"])
        r_mabn = max(samples["MABN (folded)"]) / ref
        r_med = statistics.median(samples["MABN (folded)"]) / statistics.median(samples["BN (folded)"])
        r_gn = max(samples["GN"]) / ref
        ok = "within" if abs(r_mabn - 1) <= 0.02 else "NOT within"
        L.append(f"- {device}, batch {batch}: folded MABN / folded BN = {r_mabn:.3f} ({ok} 2%; "
                 f"ratio of medians {r_med:.3f}); "
                 f"GN / folded BN = {r_gn:.3f} (paper Table 9: {6.34 / 12.73:.3f}; official release: "
                 f"{99.37 / 237.88:.3f}).")
    L.append("")
    L.append("Notes: FLOPs are FlopCounterMode totals (2 per multiply-add of convolutions and the fc "
             "layer; bias additions and normalization arithmetic are not counted), which is why the "
             "unfolded normalizations show up in the last column of the cost table rather than in "
             "GFLOPs. The paper's FLOPs column is for a different network (R-50-FPN). LN is "
             "GroupNorm(1, C). Training memory on CPU is the peak resident set size of a fresh "
             "process (it includes the Python/torch runtime); the last column of the training table "
             "subtracts the RSS measured just before the first iteration (model and inputs built).")
    return L


def render(args, costs, inference, training, command, started, wall) -> str:
    """The markdown report of one run."""
    L = (header_lines(args, command, started, wall) + inference_lines(inference) + cost_lines(costs)
         + training_lines(args, training) + table9_lines(args, costs, inference, training)
         + headline_lines(inference))
    return "\n".join(L) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: a bad size is a command-line error (exit 2)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet (resnet50; resnet18 for a quick run)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=5, help="interleaved inference repeats per (device, batch)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of forwards per inference repeat (>= 1 forward)")
    p.add_argument("--device", default="all", help="cpu, cuda, or all (cpu and, when present, cuda)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--norm-batch-size", type=int, default=2, help="MABN normalization group size in training")
    p.add_argument("--train-iters", type=int, default=2, help="timed training iterations per measurement")
    p.add_argument("--train-repeats", type=int, default=3, help="interleaved training measurements per model")
    p.add_argument("--no-train", action="store_true", help="skip the training measurements")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--note", default="", help="free text added to the report (e.g. machine shared)")
    p.add_argument("--out", default=None, help="markdown file to write (the table is printed either way)")
    p.add_argument("--_train-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bench.require_positive(p, args, "train_batch_size", "norm_batch_size", "train_iters", "train_repeats", "repeats")
    if args.batch_sizes and min(args.batch_sizes) < 1:
        p.error(f"--batch-sizes={args.batch_sizes} must all be >= 1")
    if args.image_size < (32 if args.no_train else 64):
        p.error(f"--image-size={args.image_size} must be >= {32 if args.no_train else 64} (the ResNet reduces it "
                f"32-fold; training InstanceNorm/GroupNorm needs more than one value per channel)")
    return args


def model_costs(arch: str, image_size: int) -> dict:
    """{model: params of the trained and the inference model, FLOPs and normalized elements per
    image}, and "same_graph": whether folded MABN and folded BN have the same graph."""
    costs = {}
    for n in INFERENCE_MODELS:
        trained = build_model(n, arch).eval()
        inf = inference_model(n, arch)
        costs[n] = {"params": count_params(trained), "params_inf": count_params(inf),
                     "flops": flops_per_image(inf, image_size),
                     "norm_elems": normalized_elements_per_image(inf, image_size)}
    costs["same_graph"] = (graph_signature(inference_model("BN (folded)", arch))
                            == graph_signature(inference_model("MABN (folded)", arch)))
    return costs


def devices_of(args) -> list[str]:
    """The devices to measure: --device, or with "all" the CPU and, when present, CUDA."""
    if args.device == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [args.device]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._train_worker:
        return train_worker(args)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started, t0 = datetime.datetime.now(), time.perf_counter()
    args.load_start = bench.load_average()
    command = "python scripts/bench_inference.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    devices = devices_of(args)
    if any(d.startswith("cuda") for d in devices):
        torch.backends.cudnn.benchmark = True

    log("model cost (params, FLOPs) ...")
    costs = model_costs(args.arch, args.image_size)
    inference = {}
    for device in devices:
        for batch in args.batch_sizes:
            log(f"inference {device} batch {batch} ...")
            inference[(device, batch)] = bench_inference(INFERENCE_MODELS, args.arch, device, batch,
                                                         args.image_size, args.repeats, args.min_time, log)
    training = {}
    if not args.no_train:
        for device in devices:
            log(f"training {device} ...")
            training[device] = bench_training(args, device, log)

    report = render(args, costs, inference, training, command, started, time.perf_counter() - t0)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
