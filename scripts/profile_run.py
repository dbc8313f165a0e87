#!/usr/bin/env python
"""Profile a short training run of the classifier: where an iteration's time goes.

Runs the trainer itself (train_imagenet.py's code, with the Hydra overrides given; by default
Table 2's MABN row under the reference protocol) in a temporary out_dir under the torch profiler:
--skip iterations (by default an epoch: the in-memory image cache fills during the first one),
then --iters measured ones. It reports per measured iteration the wall time and the profiled CPU
time of each part (mabn.lab.profiling): the batch (per-sample crop and flip, collation: the
trainer's data time), convolutions, weight centralization, normalization layers, activations /
pooling / linear, optimizer, other; forward and backward together. The final validation is
reported apart.

--cpu-capability avx2 makes torch's own kernels and oneDNN's convolutions run at AVX2 on a CPU
that has AVX-512 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, set before torch is imported): the
instruction-set part of a difference between CPUs, measured on one machine.

    python scripts/profile_run.py                      # MABN(2), 300 iterations
    python scripts/profile_run.py --cpu-capability avx2 experiment=table2_row1_bn_regular +protocol=r8_32px
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OVERRIDES = ["experiment=table2_row8_mabn", "+protocol=r8_32px"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help=f"Hydra overrides (default: {' '.join(DEFAULT_OVERRIDES)})")
    p.add_argument("--iters", type=int, default=300, help="training iterations measured")
    p.add_argument("--skip", type=int, default=160,
                   help="iterations run before the measured ones (default 160: an epoch of the reference "
                        "protocol, 5,000 images in batches of 32, while the image cache fills)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the studies use 1)")
    p.add_argument("--cpu-capability", choices=["default", "avx2"], default="default",
                   help="the instruction set of torch's kernels and oneDNN (default: the CPU's best)")
    p.add_argument("--out", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    if args.iters < 2 or args.threads < 1 or args.skip < 0:
        p.error(f"--iters must be >= 2, --threads >= 1, --skip >= 0; got {args.iters}, {args.threads}, {args.skip}")
    return args


def compose(overrides: list[str], iters: int, out_dir: str):
    """The trainer's validated config for ``overrides``, shortened to ``iters`` iterations (the lr
    warm-up to half of them, no lr steps: the step costs the same at any lr)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from mabn.engine import config
    ConfigStore.instance().store(name="mabn_schema", node=config.Config)
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[
            *overrides, f"schedule.iterations={iters}", f"schedule.warmup_iters={iters // 2}", "schedule.milestones=[]",
            "schedule.eval_every=0", f"schedule.ckpt_every={iters}",
            f"schedule.log_every={max(1, min(50, iters // 4))}", f"out_dir={out_dir}", "progress_bar=false"])
    return config.load(cfg)


def profile(args) -> tuple[dict, float, float, object]:
    """Train under the profiler: (seconds per part over the measured iterations, their wall
    seconds, their CPU seconds, the config)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from mabn.engine import trainer
    from mabn.lab import profiling
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = compose(args.overrides or DEFAULT_OVERRIDES, args.skip + args.iters, out_dir)
        with (torch_profile(activities=[ProfilerActivity.CPU]) as prof, profiling.label_layers(),
              profiling.iteration_clock() as cpu_times):
            result = trainer.train(cfg)
        if result.get("status") != "finished":
            raise SystemExit(f"the profiled run ended {result.get('status')!r}: {result.get('error', '')}")
    events = prof.events()
    starts = profiling.iteration_starts(events)
    parts = profiling.attribute(events, starts[args.skip])
    wall = (starts[-1] - starts[args.skip]) / 1e6 * args.iters / (args.iters - 1)
    cpu = (cpu_times[-1] - cpu_times[args.skip]) * args.iters / (args.iters - 1)
    return parts, wall, cpu, cfg


def report(args, parts: dict, wall: float, cpu: float, cfg) -> str:
    import torch

    from mabn.lab import bench, profiling
    n = args.iters
    step = {k: v for k, v in parts.items() if k not in profiling.PHASES or k == "data (the batch)"}
    total = sum(step.values())
    lines = [f"# Profile of `{' '.join(args.overrides or DEFAULT_OVERRIDES)}`", "",
             f"Command: `python scripts/profile_run.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {bench.machine_description(torch.device('cpu'))}; requested CPU capability: "
             f"{args.cpu_capability}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"{n} iterations of {cfg.data.batch_size} images ({cfg.model.arch}, norm.layer={cfg.norm.layer}, "
             f"{cfg.data.image_size} px) after {args.skip}, under the profiler: {1000 * wall / n:.1f} ms per "
             f"iteration of wall time, **{1000 * cpu / n:.1f} ms of the process's CPU time** (the figure to "
             f"compare between runs on a busy machine: other processes stretch the wall time and the "
             f"parts below, which are wall-clock intervals).", "",
             "Profiled CPU time of the training iterations (self time of every event, charged to the "
             "part it runs in):", "",
             "| part | ms per iteration | share |", "|---|---:|---:|"]
    for part in ["data (the batch)", *profiling.PARTS, "other"]:
        if part in step:
            lines.append(f"| {part} | {1000 * step[part] / n:.2f} | {100 * step[part] / total:.1f}% |")
    lines += [f"| all | {1000 * total / n:.2f} | 100% |", "",
              f"The final validation: {parts.get('validation', 0.0):.1f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cpu_capability == "avx2":
        if "torch" in sys.modules:
            print("--cpu-capability avx2 needs a fresh process (torch is already imported)", file=sys.stderr)
            return 2
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    from mabn.engine import config
    from mabn.lab import bench
    try:
        parts, wall, cpu, cfg = profile(args)
    except config.ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    bench.write_report(report(args, parts, wall, cpu, cfg), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
