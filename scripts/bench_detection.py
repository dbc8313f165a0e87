#!/usr/bin/env python
"""The detector's Table 9: training speed and peak memory with BN, GN and MABN (and SyncBN on a
2-rank gloo run), and inference speed with MABN folded, side by side in one run.

The detectors are the trainer's own (scripts/train_detection.py's config: a det_experiment row
preset, by default under +protocol=det_small, so the small Mask R-CNN at 128 px), on real samples
of a COCO-format data set (--data; the built det-tiny10 by default):

- training: one step = forward (the detector's losses) + backward + SGD on a fixed batch of
  --batch images, the batch-statistics norms in groups of 2; --warmup untimed and --iters timed
  round-robin rounds (mabn.lab.bench.round_robin: every network once per round, the order
  reversed in every other round); iterations/s = 1 / the median step;
- peak memory: each network in a fresh process (spawned), its peak resident set during
  --mem-steps steps (the kernel's high-water mark, reset before the first step), and that minus
  its resident set before the first step (the step's own memory); on CUDA
  torch.cuda.max_memory_allocated;
- SyncBN (--sync-ranks 2): a 2-rank gloo DDP run, each rank --batch / 2 images, every rank one
  thread, SyncBN (mabn.SyncBatchNorm2d over both ranks' images) against BN (each rank its own
  groups of 2), iterations/s of the whole step;
- RoIAlign (CPU only): the first network's training step with torchvision's RoI poolers against
  mabn's (mabn.detection.roi_align: torchvision's forward, the backward one sparse product),
  round-robin as above;
- inference: eval mode, one image per call (the paper's Table 9 measures inference of single
  images), every network as trained and folded (mabn.fold.fold_model: the normalizations torch.fx
  can trace go into their convolutions), images/s over --infer-images images.

    python scripts/bench_detection.py --out results/table9.md      # the figures (~10 min on 2 cores)
    python scripts/bench_detection.py --iters 2 --warmup 0 --infer-images 4 --sync-ranks 0   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from torchvision.ops import MultiScaleRoIAlign

import mabn
from mabn.detection import config as det_config
from mabn.detection.coco import CocoDetection, batch_to, collate
from mabn.detection.models import build_detector
from mabn.lab import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: name in the tables: the det_experiment row preset (configs/det_experiment/) it is built from.
NETWORKS = {"BN": "table3_bn", "GN": "table3_gn", "MABN": "table3_mabn", "SyncBN": "table3_syncbn"}


def detection_config(preset: str, args):
    """The trainer's resolved config of ``det_experiment=<preset>`` plus ``args.overrides``."""
    ConfigStore.instance().store(name="detection_schema", node=det_config.DetectionConfig)
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        cfg = compose(config_name="detection", overrides=[f"det_experiment={preset}", *args.overrides,
                                                          f"data.root={args.data}", f"device={args.device}"])
    return det_config.load(cfg)


def samples(args, masks: bool):
    """The first ``args.batch`` training samples (images, targets) and ``args.infer_images``
    validation images of the data set."""
    train = CocoDetection(args.data, "train", masks=masks, train=False, cache=True)
    val = CocoDetection(args.data, "val", masks=masks, train=False, cache=True)
    images, targets = collate([train[i] for i in range(args.batch)])
    return images, targets, [val[i][0] for i in range(args.infer_images)], train.num_classes


def build(name: str, args, num_classes: int, device) -> torch.nn.Module:
    """A fresh detector of network ``name`` on ``device``, in training mode."""
    cfg = detection_config(NETWORKS[name], args)
    torch.manual_seed(0)
    return build_detector(cfg.model, cfg.norm, num_classes).to(device).train()


def make_step(model, images, targets):
    """One SGD step of the detector's summed losses."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        sum(model(images, targets).values()).backward()
        opt.step()
    return step


def train_times(args, data, device) -> dict[str, list[float]]:
    """Seconds per training step of every network, round-robin."""
    images, targets = batch_to(*data[:2], device)
    num_classes = data[3]
    steps = {name: make_step(build(name, args, num_classes, device), images, targets) for name in args.networks}
    for step in steps.values():  # the first step allocates: not timed
        step()
    return bench.round_robin(steps, args.iters, args.warmup, device)


def roi_align_times(args, data, device) -> dict[str, list[float]]:
    """Seconds per training step of the first network with torchvision's RoI poolers and with
    mabn's (the detector's own), round-robin; {} off the CPU (there both are torchvision's)."""
    if device.type != "cpu":
        return {}
    images, targets = batch_to(*data[:2], device)
    steps = {}
    for poolers in ("torchvision", "mabn"):
        model = build(args.networks[0], args, data[3], device)
        if poolers == "torchvision":
            for part in ("box_roi_pool", "mask_roi_pool"):
                mine = getattr(model.roi_heads, part, None)
                if mine is not None:
                    setattr(model.roi_heads, part, MultiScaleRoIAlign(mine.featmap_names, mine.output_size,
                                                                      mine.sampling_ratio))
        steps[f"{args.networks[0]}, {poolers}'s RoIAlign"] = step = make_step(model, images, targets)
        step()
    return bench.round_robin(steps, args.iters, args.warmup, device)


@torch.no_grad()
def infer_times(args, data, device) -> dict[str, list[float]]:
    """Seconds per validation image of every network as trained and folded, round-robin over
    rounds of all the images. The trained weights do not matter for the time: each network
    takes a few training steps first, so that its running statistics are not the initial ones."""
    images, targets = batch_to(*data[:2], device)
    val_images, num_classes = [im.to(device) for im in data[2]], data[3]
    fns = {}
    for name in args.networks:
        model = build(name, args, num_classes, device)
        with torch.enable_grad():
            make_step(model, images, targets)()
        model.eval()
        folded = mabn.fold.fold_model(model)
        for label, net in ((name, model), (f"{name} folded", folded)):
            fns[label] = (lambda net=net: [net([im]) for im in val_images])
    rounds = bench.round_robin(fns, args.iters, args.warmup, device)
    return {k: [t / len(val_images) for t in v] for k, v in rounds.items()}


def _memory_child(name: str, args, queue) -> None:
    """In a fresh process: (resident MB before the first step, peak resident MB during the
    steps). The peak is the kernel's high-water mark, reset before the first step (writing 5 to
    /proc/self/clear_refs), so that loading the data and building the model do not count."""
    torch.set_num_threads(args.threads)
    data = samples(args, masks=True)
    model = build(name, args, data[3], torch.device(args.device))
    step = make_step(model, *data[:2])
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(args.mem_steps):
        step()
    queue.put((before, _status_mb("VmHWM")))


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: the peak), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(args) -> dict[str, tuple[float, float]]:
    """{network: (peak resident MB, peak minus the resident MB before the first step)}, each
    network in its own spawned process (CPU), or torch.cuda.max_memory_allocated (CUDA)."""
    out = {}
    ctx = mp.get_context("spawn")
    for name in args.networks:
        if args.device.startswith("cuda"):
            out[name] = _cuda_peak(name, args)
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(name, args, queue))
        proc.start()
        before, peak = queue.get(timeout=1800)
        proc.join()
        out[name] = (peak, peak - before)
    return out


def _cuda_peak(name: str, args) -> tuple[float, float]:
    device = torch.device(args.device)
    data = samples(args, masks=True)
    step = make_step(build(name, args, data[3], device), *batch_to(*data[:2], device))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device) / 2 ** 20
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.mem_steps):
        step()
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak, peak - before


def _sync_rank(rank: int, world: int, init: str, args, queue) -> None:
    """One rank of the gloo run: SyncBN and BN detectors in DDP, each rank its half of the batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    images, targets, _, num_classes = samples(args, masks=True)
    share = len(images) // world
    mine = slice(rank * share, (rank + 1) * share)
    steps = {}
    for name in ("SyncBN", "BN"):
        model = DDP(build(name, args, num_classes, torch.device("cpu")), broadcast_buffers=False)
        steps[name] = make_step(model, images[mine], targets[mine])
        steps[name]()
    times = bench.round_robin(steps, args.iters, args.warmup, torch.device("cpu"))
    if rank == 0:
        queue.put(times)
    dist.barrier()
    dist.destroy_process_group()


def sync_times(args, folder: str) -> dict[str, list[float]]:
    """Seconds per step of the 2-rank gloo run (rank 0's clock), SyncBN and BN."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{os.path.join(folder, 'gloo_init')}"
    procs = [ctx.Process(target=_sync_rank, args=(r, args.sync_ranks, init, args, queue))
             for r in range(args.sync_ranks)]
    for p in procs:
        p.start()
    times = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return times


def _ms(xs: list[float]) -> str:
    return f"{1000 * statistics.median(xs):.0f}"


def train_lines(args, times, memory) -> list[str]:
    """Table 9's training half: steps per second, images per second, peak memory."""
    base = statistics.median(times["BN"]) if "BN" in times else None
    L = [f"## Training (one process, steps of {args.batch} images)\n",
         "| network | step (ms) | iterations/s | images/s | vs BN | spread | peak RSS (MB) | step's own (MB) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, xs in times.items():
        m = statistics.median(xs)
        peak, own = memory.get(name, (float("nan"), float("nan")))
        ratio = f"{base / m:.3f}" if base else "-"
        L.append(f"| {name} | {_ms(xs)} | {1 / m:.2f} | {args.batch / m:.1f} | {ratio} | "
                 f"{bench.spread(xs):.0f}% | {peak:.0f} | {own:.0f} |")
    return L + [""]


def sync_lines(args, times) -> list[str]:
    if not times:
        return []
    L = [f"## SyncBN: {args.sync_ranks}-rank gloo DDP run ({args.batch // args.sync_ranks} images per rank, "
         f"one thread each)\n", "| network | step (ms) | iterations/s | vs BN |", "|---|---:|---:|---:|"]
    for name, xs in times.items():
        L.append(f"| {name} | {_ms(xs)} | {1 / statistics.median(xs):.2f} | "
                 f"{statistics.median(times['BN']) / statistics.median(xs):.3f} |")
    return L + [""]


def roi_align_lines(args, times) -> list[str]:
    if not times:
        return []
    tv_xs = next(iter(times.values()))  # torchvision's poolers: the speed-up's base
    L = ["## RoIAlign's CPU backward: torchvision's poolers against mabn's\n",
         "| network | step (ms) | iterations/s | speed-up |", "|---|---:|---:|---:|"]
    for name, xs in times.items():
        L.append(f"| {name} | {_ms(xs)} | {1 / statistics.median(xs):.2f} | "
                 f"{statistics.median(tv_xs) / statistics.median(xs):.3f} |")
    return L + [""]


def infer_lines(args, times) -> list[str]:
    base = statistics.median(times["BN"]) if "BN" in times else None
    L = ["## Inference (eval mode, one image per call)\n",
         "| network | ms per image | images/s | vs BN (unfolded) |", "|---|---:|---:|---:|"]
    for name, xs in times.items():
        m = statistics.median(xs)
        L.append(f"| {name} | {1000 * m:.1f} | {1 / m:.2f} | {base / m if base else float('nan'):.3f} |")
    return L + [""]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "data", "det-tiny10"), help="a COCO-format data set")
    p.add_argument("--networks", nargs="+", default=["BN", "GN", "MABN"], choices=["BN", "GN", "MABN", "SyncBN"])
    p.add_argument("--batch", type=int, default=8, help="images per training step")
    p.add_argument("--iters", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--mem-steps", type=int, default=3, help="steps of each memory measurement")
    p.add_argument("--infer-images", type=int, default=16)
    p.add_argument("--sync-ranks", type=int, default=2, help="ranks of the gloo SyncBN run (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the report here (markdown)")
    p.add_argument("overrides", nargs="*", default=["+protocol=det_small"],
                   help="Hydra overrides of the detection config (default: +protocol=det_small)")
    args = p.parse_args(argv)
    bench.require_positive(p, args, "batch", "iters", "mem_steps", "infer_images", "threads")
    if args.batch % 2 or (args.sync_ranks and args.batch % (2 * args.sync_ranks)):
        p.error(f"--batch {args.batch} must split into groups of 2 images on each of the ranks")
    if not os.path.isfile(os.path.join(args.data, "annotations", "instances_train.json")):
        p.error(f"--data {args.data}: no annotations/instances_train.json (python scripts/make_detection_data.py "
                f"{args.data} --seed 0 builds it)")
    try:
        bench.resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    device, started, t0 = torch.device(args.device), datetime.datetime.utcnow(), time.time()
    load_start = bench.load_average()
    data = samples(args, masks=True)
    train, infer = train_times(args, data, device), infer_times(args, data, device)
    pooling = roi_align_times(args, data, device)
    memory = peak_memory(args)
    sync = {}
    if args.sync_ranks:
        import tempfile
        with tempfile.TemporaryDirectory() as folder:
            sync = sync_times(args, folder)
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/bench_detection.py", *sys.argv[1:]])
    head = ["# The detector's Table 9: training and inference speed, peak memory\n",
            f"- Command: `{command}`", f"- Date: {started:%Y-%m-%d %H:%M} UTC; wall time {(time.time() - t0) / 60:.1f} min",
            f"- Machine: {bench.machine_description(device)}",
            f"- Load average (1, 5, 15 min) at start: {load_start}; at end: {bench.load_average()}",
            f"- Detectors: scripts/train_detection.py's det_experiment rows {dict((n, NETWORKS[n]) for n in args.networks)} "
            f"with {' '.join(args.overrides)}; data {args.data}. Median over {args.iters} timed round-robin rounds "
            f"after {args.warmup} untimed; spread = (max - min) / median.",
            "- The paper's Table 9 (Mask R-CNN R50-FPN, 8 GPUs x 2 images): training 2.35 / 2.22 / 1.81 it/s and "
            "58.9 / 58.9 / 60.6 GB for BN / GN / MABN; inference 12.73 / 6.34 / 12.73 it/s (MABN folded).", ""]
    bench.write_report("\n".join(head + train_lines(args, train, memory) + sync_lines(args, sync)
                                 + roi_align_lines(args, pooling) + infer_lines(args, infer)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
