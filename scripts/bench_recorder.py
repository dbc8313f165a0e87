#!/usr/bin/env python
"""Cost of the statistics recorder: training-step time with and without it, side by side.

A ResNet-18 (small-input stem, 32x32 inputs) with MABN is trained for a number of steps in each of
three arms, interleaved step by step so that machine noise hits all arms alike: no recorder
(no hooks at all), and the recorder on layer1.0.bn1 every k iterations (k = 10 by default) and
every iteration. Prints mean step times and each arm's ratio to the arm without the recorder.

    python scripts/bench_recorder.py --steps 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torchvision
from torch import nn

import mabn
from mabn.stats import StatisticsRecorder


def small_resnet18(num_classes=10):
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return mabn.convert_model(model, dict(form="modified", fp_stats="ema", bp_stats="sma",
                                          norm_batch_size=2, alpha=0.98), weight_centralization=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--every", type=int, default=10)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    tmp = tempfile.mkdtemp()
    arms = {}
    for name, every in (("off", None), (f"k={args.every}", args.every), ("k=1", 1)):
        model = small_resnet18()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        rec = None if every is None else StatisticsRecorder(model, every=every, csv_path=os.path.join(tmp, f"{name}.csv"))
        arms[name] = (model, opt, rec, [])
    for step in range(1, args.steps + 2):
        for name, (model, opt, rec, times) in arms.items():
            t0 = time.perf_counter()
            if rec is not None:
                rec.start(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if rec is not None:
                rec.finish()
            opt.step()
            if step > 1:  # the first step warms up allocators
                times.append(time.perf_counter() - t0)
    base = statistics.mean(arms["off"][3])
    print(f"ResNet-18 (small stem) + MABN, batch {args.batch_size}x3x32x32, {args.steps} steps per arm, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (_, _, _, times) in arms.items():
        mean = statistics.mean(times)
        print(f"  recorder {name:>6}: {1e3 * mean:8.1f} ms/step  ({mean / base:.3f}x of no recorder)")


if __name__ == "__main__":
    main()
