#!/usr/bin/env python
"""Training and validation images/s of ONE data-loading process on ImageNet-sized JPEGs, for the
two decoders of the trainer (data.decoder): PIL images + torchvision.transforms ("pil") against
torchvision.io.decode_image + transforms.v2 on uint8 tensors ("tensor"); and from that, how many
CPU cores (one loader worker each) feed one GPU at an ASSUMED ResNet-50 training speed.

What is timed is what a DataLoader worker does per training sample: the trainer's own dataset
objects (RobustImageFolder + SeededSamples, the transforms of mabn.engine.data at 224 px):
read + decode + RandomResizedCrop + colour jitter + ToTensor + lighting + normalize + flip, or for
validation decode + resize 256 + centre crop 224 + ToTensor + normalize. Not timed: batching
(collate), the hand-over to the main process and the host-to-GPU copy. One thread
(torch.set_num_threads(1)), as in a DataLoader worker. The pipelines run round-robin (one pass
over the images each, in turn, per repeat) and the median over repeats is reported.

The images are generated (no download): smooth colour fields, soft-edged shapes and two scales
of noise texture, at ImageNet's common sizes (mostly 500x375), saved by PIL at JPEG quality 90.
``--images-from DIR`` times real files instead (every *.JPEG/*.jpg/*.png below DIR).

    python scripts/bench_data.py                            # 200 generated images, 5 repeats
    python scripts/bench_data.py --out results/speed.md     # on a quiet machine
    python scripts/bench_data.py --images-from /data/imagenet/train/n01440764 --images 300
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import io
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter, features

from mabn.engine import config, data
from mabn.lab import bench

# ImageNet's typical sizes (most training images are 500 px on the long side, 4:3 landscape first).
SIZES = [(500, 375)] * 10 + [(375, 500)] * 3 + [(500, 333)] * 3 + [(500, 500)] * 2 + [(640, 480), (333, 500)]
GPU_ASSUMPTION = ("ResNet-50 training with mixed precision on one A100/H100-class GPU, ~1,200 "
                  "images/s: an ASSUMPTION (order of magnitude of published torchvision/NVIDIA "
                  "figures), not measured here")


def natural_jpeg(width: int, height: int, seed: int, quality: int = 90, noise: float = 12.0) -> bytes:
    """A photo-like JPEG: a smooth random colour field, 25 soft-edged shapes, noise texture at
    pixel and 4-pixel scales (flat noise or flat colour would decode unrealistically)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 7, generator=g), size=(height, width),
                                            mode="bicubic", align_corners=False)[0]
    img = Image.fromarray((field.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randrange(10, width // 2), y0 + rng.randrange(10, height // 2)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        kind = rng.random()
        if kind < 0.4:
            draw.ellipse(box, fill=colour)
        elif kind < 0.7:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(rng.randrange(width), rng.randrange(height)) for _ in range(4)], fill=colour)
    pixels = torch.from_numpy(np.array(img.filter(ImageFilter.GaussianBlur(1.0)))).float()
    fine = torch.randn(height, width, 1, generator=g) * noise + torch.randn(height, width, 3, generator=g) * noise / 3
    coarse = torch.nn.functional.interpolate(torch.randn(1, 1, height // 4, width // 4, generator=g),
                                             size=(height, width), mode="bilinear")[0].permute(1, 2, 0)
    pixels = (pixels + fine + 1.5 * noise * coarse).clamp(0, 255).byte().numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_images(folder: str, n: int, quality: int) -> list[str]:
    """n generated JPEGs in folder/class0 (an ImageFolder with one class)."""
    os.makedirs(os.path.join(folder, "class0"), exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = os.path.join(folder, "class0", f"img{i:05d}.JPEG")
        with open(path, "wb") as f:
            f.write(natural_jpeg(w, h, seed=i, quality=quality))
        paths.append(path)
    return paths


def link_images(src: str, folder: str, n: int) -> list[str]:
    """Up to n image files found below src, symlinked into folder/class0 (sorted, the first n)."""
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(src) for f in files
                   if f.lower().endswith((".jpeg", ".jpg", ".png")))[:n]
    os.makedirs(os.path.join(folder, "class0"), exist_ok=True)
    paths = []
    for i, p in enumerate(found):
        dst = os.path.join(folder, "class0", f"img{i:05d}" + os.path.splitext(p)[1])
        os.symlink(os.path.abspath(p), dst)
        paths.append(dst)
    return paths


def data_config(decoder: str, image_size: int, val_resize: int):
    """The ImageNet data config (configs/data/imagenet.yaml's augmentation) with this decoder."""
    return config.load({"data": {"name": "synthetic", "image_size": image_size, "val_resize": val_resize,
                                 "min_crop_area": 0.08, "color_jitter": 0.4, "lighting": 0.1,
                                 "augment": "fb", "decoder": decoder}}).data


# variant -> (data.decoder, loader): the two settings, and data.decoder=tensor with PIL decoding
# (what it falls back to where torchvision.io cannot decode, e.g. a torchvision without it).
VARIANTS = {"pil": ("pil", data.image_loader("pil")), "tensor": ("tensor", data.read_image),
            "tensor_pil_decode": ("tensor", data.pil_read_image)}


def pipelines(folder: str, image_size: int, val_resize: int) -> dict:
    """"<train|val|decode>/<variant>" -> dataset whose item i is what a loader worker produces
    for image i."""
    out = {}
    for variant, (decoder, load) in VARIANTS.items():
        cfg = data_config(decoder, image_size, val_resize)
        out[f"train/{variant}"] = data.SeededSamples(
            data.RobustImageFolder(folder, data.train_transform(cfg), loader=load), seed=0)
        out[f"val/{variant}"] = data.RobustImageFolder(folder, data.val_transform(cfg), loader=load)
        out[f"decode/{variant}"] = data.RobustImageFolder(folder, None, loader=load)
    return out


def time_pipelines(sets: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """images/s of each pipeline per repeat (round-robin: one pass of each, in turn)."""
    rates = {name: [] for name in sets}
    for rep in range(warmup + repeats):
        for name, ds in sets.items():
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            dt = time.perf_counter() - t0
            if rep >= warmup:
                rates[name].append(len(ds) / dt)
    return rates


def equivalence(sets: dict, mean, std) -> dict:
    """Pixel differences, tensor against pil, on the same samples (same seeds, so the same crop
    boxes, flips, jitter and lighting), in levels of 255 before normalization."""
    s = torch.tensor(std)[:, None, None] * 255
    out = {}
    for kind in ("train", "val"):
        diffs = [((sets[f"{kind}/tensor"][i][0] - sets[f"{kind}/pil"][i][0]) * s).flatten()
                 for i in range(len(sets[f"{kind}/pil"]))]
        d = torch.cat(diffs)
        out[kind] = dict(mean=d.mean().item(), mean_abs=d.abs().mean().item(),
                         frac=(d.abs() > 0.5).float().mean().item(), max=d.abs().max().item())
    return out


def reduced_decode_share(paths: list[str], image_size: int, val_resize: int, draws: int = 20) -> tuple[float, float]:
    """Share of training crops (RandomResizedCrop boxes drawn for these image sizes) and of
    validation images for which a JPEG decoded at 1/2 scale (the largest reduction libjpeg
    offers, e.g. PIL's Image.draft) would still hold at least the output size, i.e. where
    reduced-size decoding could save work without upsampling."""
    crop = torchvision.transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0))
    g = torch.random.fork_rng(devices=[])
    train_ok = val_ok = 0
    with g:
        torch.manual_seed(0)
        for p in paths:
            with Image.open(p) as im:
                w, h = im.size
            probe = torch.empty(3, h, w, dtype=torch.uint8)
            for _ in range(draws):
                _, _, ch, cw = crop.get_params(probe, crop.scale, crop.ratio)
                train_ok += min(ch, cw) >= 2 * image_size
            val_ok += min(w, h) >= 2 * val_resize
    return train_ok / (len(paths) * draws), val_ok / len(paths)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: a bad value is a command-line error (exit 2)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="images per pass (default 200)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated images")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--val-resize", type=int, default=256)
    p.add_argument("--gpu-images-per-s", type=float, nargs="+", default=[1200.0],
                   help="ASSUMED training speeds of one GPU (images/s) to convert into cores")
    p.add_argument("--images-from", help="time the image files below this folder instead of generated ones")
    p.add_argument("--out", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    for key in ("images", "repeats", "image_size", "val_resize"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.warmup < 0 or not 1 <= args.quality <= 100 or args.val_resize < args.image_size:
        p.error("--warmup must be >= 0, --quality in [1, 100], --val-resize >= --image-size")
    if any(r <= 0 for r in args.gpu_images_per_s):
        p.error("--gpu-images-per-s must be > 0")
    if args.images_from and not any(f.lower().endswith((".jpeg", ".jpg", ".png"))
                                    for _, _, files in os.walk(args.images_from) for f in files):
        p.error(f"--images-from {args.images_from}: no .JPEG/.jpg/.png file below it (or no such folder)")
    return args


def images_in(folder: str, args) -> tuple[list[str], str]:
    """The images to time, put into ``folder`` (generated, or linked from --images-from), and the
    report's description of them (source, sizes, mean file size, bits per pixel)."""
    if args.images_from:
        paths = link_images(args.images_from, folder, args.images)
        source = f"{len(paths)} files from {args.images_from}"
    else:
        paths = make_images(folder, args.images, args.quality)
        source = (f"{len(paths)} generated JPEGs (quality {args.quality}; sizes "
                  f"{', '.join(sorted({f'{w}x{h}' for w, h in SIZES[:len(paths)]}))}, "
                  f"{sum(s == (500, 375) for s in SIZES) / len(SIZES):.0%} of them 500x375)")
    sizes = [os.path.getsize(os.path.realpath(q)) for q in paths]
    pixels = []
    for q in paths:
        with Image.open(q) as im:
            pixels.append(im.size[0] * im.size[1])
    source += (f"; mean file {statistics.mean(sizes) / 1024:.0f} KB, "
               f"{8 * sum(sizes) / sum(pixels):.2f} bits/pixel (ImageNet's training JPEGs: ~110 KB on average)")
    return paths, source


def measure(args) -> dict:
    """Everything the report shows, measured on images in a temporary folder (removed after):
    "source" (the images' description), "rates" ({pipeline: images/s per repeat}), "eq" (pixel
    differences tensor - pil, :func:`equivalence`) and "share_train" / "share_val"
    (:func:`reduced_decode_share`)."""
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    try:
        paths, source = images_in(tmp, args)
        sets = pipelines(tmp, args.image_size, args.val_resize)
        print(f"timing {len(paths)} images x {args.repeats} repeats (+{args.warmup} warm-up) ...", flush=True)
        rates = time_pipelines(sets, args.repeats, args.warmup)
        cfg = data_config("pil", args.image_size, args.val_resize)
        eq = equivalence(sets, list(cfg.mean), list(cfg.std))
        share_train, share_val = reduced_decode_share(paths, args.image_size, args.val_resize)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"source": source, "rates": rates, "eq": eq, "share_train": share_train, "share_val": share_val}


def header_lines(args, argv, source: str) -> list[str]:
    """The report's opening: what is timed, the command, the machine, the versions, the images."""
    cmd = "python scripts/bench_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return [
        "Images/s of ONE data-loading process (one thread), what a DataLoader worker does per sample;",
        f"median of {args.repeats} round-robin repeats (min-max in brackets).",
        "",
        f"- command: `{cmd.strip()}`",
        f"- CPU: {bench.cpu_model()} (torch CPU kernels: {bench.cpu_capability()}; {os.cpu_count()} logical CPUs seen; 1 thread used)",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__} "
        f"(libjpeg-turbo {features.version('libjpeg_turbo') or 'no'}), Python {sys.version.split()[0]}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- images: {source}",
        "",
    ]


def throughput_lines(args, rates: dict[str, list[float]]) -> list[str]:
    """The images/s table: one row per pipeline (train, val, decode), one column per variant."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    what = {"train": f"train, fb at {args.image_size} px (decode, RandomResizedCrop, jitter 0.4, ToTensor, "
                     f"lighting 0.1, normalize, flip)",
            "val": f"val (decode, resize {args.val_resize}, centre crop {args.image_size}, ToTensor, normalize)",
            "decode": "decode only (read + decode to RGB)"}
    lines = [
        "Columns: data.decoder=pil; data.decoder=tensor (torchvision.io decoding); data.decoder=tensor",
        "with PIL decoding (its fallback where torchvision.io cannot decode).",
        "",
        "| pipeline | pil img/s | tensor img/s | tensor, PIL decode img/s | tensor / pil |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in ("train", "val", "decode"):
        cells = [f"{med[f'{kind}/{v}']:.0f} [{min(rates[f'{kind}/{v}']):.0f}-{max(rates[f'{kind}/{v}']):.0f}]"
                 for v in VARIANTS]
        lines.append(f"| {what[kind]} | " + " | ".join(cells) +
                     f" | {med[f'{kind}/tensor'] / med[f'{kind}/pil']:.2f}x |")
    return lines


def cores_lines(args, rates: dict[str, list[float]]) -> list[str]:
    """The table of loader cores one GPU needs at each assumed GPU speed, per decoder."""
    pil, tensor = statistics.median(rates["train/pil"]), statistics.median(rates["train/tensor"])
    lines = [
        "",
        f"Cores (one worker process each) to feed one GPU in training = GPU images/s / per-process "
        f"images/s (train row), rounded up; the GPU speed is {GPU_ASSUMPTION}. Add the main "
        f"process (collate, copy to the GPU) and head-room.",
        "",
        "| GPU images/s (assumed) | cores, pil | cores, tensor |",
        "|---:|---:|---:|",
    ]
    for r in args.gpu_images_per_s:
        lines.append(f"| {r:,.0f} | {math.ceil(r / pil)} ({r / pil:.1f}) | "
                     f"{math.ceil(r / tensor)} ({r / tensor:.1f}) |")
    return lines


def equivalence_lines(eq: dict) -> list[str]:
    """The table of pixel differences between the two decoders' outputs, and what causes them."""
    lines = [
        "",
        "Same augmentation: the two decoders draw the same random numbers in the same order (same",
        "crop boxes, flips, jitter order and factors, lighting noise). Pixel differences tensor - pil",
        "on these images, same seeds, in levels of 255 before normalization:",
        "",
        "| | mean | mean abs | share of values differing | max abs |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in ("train", "val"):
        e = eq[kind]
        lines.append(f"| {kind} | {e['mean']:+.4f} | {e['mean_abs']:.4f} | {e['frac']:.2%} | {e['max']:.2f} |")
    return lines + [
        "",
        "Only the antialiased bilinear resizes differ (torch's uint8 kernel against PIL's, at most 1",
        "level; the colour jitter can scale a difference up to a few levels).",
        "",
    ]


def reduced_decode_line(share_train: float, share_val: float) -> str:
    """Whether reduced-size JPEG decoding is offered here and how often it could apply."""
    decode_params = inspect.signature(torchvision.io.decode_jpeg).parameters
    reduced = [n for n in decode_params if n in ("scale", "size", "scale_denom", "dct_scale")]
    return (f"Reduced-size JPEG decoding: torchvision {torchvision.__version__}'s decode_jpeg "
            + (f"has {reduced}" if reduced else "offers none (no scale/size argument)")
            + f"; PIL's Image.draft (DCT scaling) would keep >= the output size at 1/2 scale for "
            f"{share_train:.1%} of the training crops and {share_val:.1%} of the validation images here, "
            "so it is not used.")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    m = measure(args)
    lines = (header_lines(args, argv, m["source"]) + throughput_lines(args, m["rates"])
             + cores_lines(args, m["rates"]) + equivalence_lines(m["eq"])
             + [reduced_decode_line(m["share_train"], m["share_val"])])
    bench.write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
