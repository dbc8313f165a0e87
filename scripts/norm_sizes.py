#!/usr/bin/env python
"""Values per channel that each normalization layer sees in one group: n = b x H x W.

The small-batch regime depends on n, not on b alone: the paper's ResNet-50 at 224 px with b = 2
normalizes 25,088 values per channel after the stem and 98 in its last stage (7x7 maps). Prints,
per stage of a model config, the smallest and largest n over its normalization layers.

    python scripts/norm_sizes.py --arch resnet8 --image-size 32 --b 2
    python scripts/norm_sizes.py --arch resnet50 --image-size 224 --b 2 --imagenet-stem
"""

from __future__ import annotations

import argparse
import sys

import torch
from omegaconf import OmegaConf
from torch import nn

from mabn.engine import models


def norm_sizes(arch: str, image_size: int, b: int, small_input: bool) -> dict[str, list[int]]:
    """{stage: [n of each normalization layer]} for one forward pass of b images."""
    model = models.build_stock_model(OmegaConf.create({"arch": arch, "small_input": small_input}), 10).eval()
    sizes: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            stage = name.split(".")[0] if name.startswith("layer") else "stem"
            mod.register_forward_hook(lambda m, inp, out, stage=stage: sizes.setdefault(stage, []).append(
                inp[0].shape[0] * inp[0].shape[2] * inp[0].shape[3]))
    with torch.no_grad():
        model(torch.zeros(b, 3, image_size, image_size))
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet8", choices=models.ARCHS)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--b", type=int, default=2, help="images per normalization group")
    p.add_argument("--imagenet-stem", action="store_true", help="torchvision archs: 7x7/2 stem + max-pool")
    args = p.parse_args(argv)
    sizes = norm_sizes(args.arch, args.image_size, args.b, not args.imagenet_stem)
    print(f"{args.arch} at {args.image_size} px, b = {args.b}: n = b x H x W per channel")
    print("| stage | layers | n (min) | n (max) |")
    print("|---|---:|---:|---:|")
    for stage, ns in sizes.items():
        print(f"| {stage} | {len(ns)} | {min(ns):,} | {max(ns):,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
