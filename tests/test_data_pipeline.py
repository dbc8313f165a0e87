"""The two image pipelines of data.decoder (PIL images vs uint8 tensors): the same random draws,
the same pixels up to the resize's rounding, the decoder itself, and scripts/bench_data.py.
Every image is made here (small JPEGs/PNGs written by PIL); nothing reads ../shared/data."""

import io
import math
import os
import re
import textwrap

import numpy as np
import pytest

import torch
from PIL import Image, ImageEnhance
from torchvision import transforms
from torchvision.transforms import v2

from mabn.engine import config, data

from _train_utils import PYTHON, make_image_folder, run_script

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
EIGVAL = [0.2175, 0.0188, 0.0045]
EIGVEC = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]


def photo(width, height, seed, mode="RGB") -> Image.Image:
    """A smooth colour gradient with a disc and pixel noise (PIL image of ``mode``)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 7.0 + seed)], -1)
    rgb[(x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2] = g.integers(0, 256, 3)
    rgb = np.clip(rgb + g.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def save(img: Image.Image, path, fmt="JPEG") -> str:
    img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return str(path)


def data_cfg(**kw):
    return config.load({"data": {"name": "synthetic", **kw}}).data


def levels(x: torch.Tensor) -> torch.Tensor:
    """A normalized image back in levels of 255 (for differences between pipelines)."""
    return x * torch.tensor(STD)[:, None, None] * 255


# --- the same random draws ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (40, 400), (23, 17)])
def test_crop_boxes_are_drawn_alike(shape):
    """v2.RandomResizedCrop (decoder=tensor) draws the same box as transforms.RandomResizedCrop
    (decoder=pil) for the same seed, including the fallback of extreme aspect ratios (40 x 400),
    and consumes the same random numbers (the next draw agrees)."""
    h, w = shape
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    new = v2.RandomResizedCrop(224, scale=(0.08, 1.0))
    boxes = set()
    for seed in range(200):
        torch.manual_seed(seed)
        ref = transforms.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), [0.08, 1.0], [3 / 4, 4 / 3])
        ref_next = torch.rand(1)
        torch.manual_seed(seed)
        p = new.make_params([img])
        assert (p["top"], p["left"], p["height"], p["width"]) == ref
        assert torch.equal(torch.rand(1), ref_next)
        boxes.add(ref)
    assert len(boxes) > 100 if min(shape) > 100 else len(boxes) > 1  # the draws do vary


@pytest.mark.parametrize("augment", ["fb", "crop_flip"])
def test_both_pipelines_consume_the_same_random_numbers(tmp_path, augment):
    """After a whole training transform the generator is in the same state for both decoders,
    so later draws (the next sample, the next transform) agree too."""
    path = save(photo(64, 48, 0), tmp_path / "a.jpg")
    cfgs = {d: data_cfg(image_size=32, augment=augment, decoder=d) for d in ("pil", "tensor")}
    for seed in range(20):
        after = {}
        for d, cfg in cfgs.items():
            torch.manual_seed(seed)
            data.train_transform(cfg)(data.image_loader(d)(path))
            after[d] = torch.rand(4)
        assert torch.equal(after["pil"], after["tensor"])


def test_flip_probability_and_crop_offsets_alike():
    """RandomHorizontalFlip and RandomCrop with padding: the tensor (v2) versions make the
    decisions of the PIL ones for each seed; about half of the seeds flip."""
    img = torch.arange(3 * 10 * 14, dtype=torch.uint8).view(3, 10, 14)
    pil = transforms.functional.to_pil_image(img)
    flips = 0
    for seed in range(400):
        torch.manual_seed(seed)
        a = transforms.functional.pil_to_tensor(transforms.RandomHorizontalFlip()(pil))
        torch.manual_seed(seed)
        b = v2.RandomHorizontalFlip()(img)
        assert torch.equal(a, b)
        flips += not torch.equal(b, img)
        torch.manual_seed(seed)
        a = transforms.functional.pil_to_tensor(transforms.RandomCrop(8, padding=3)(pil))
        torch.manual_seed(seed)
        assert torch.equal(v2.RandomCrop(8, padding=3)(img), a)
    assert 160 <= flips <= 240  # Binomial(400, 0.5): mean 200, sd 10


# --- the colour jitter ------------------------------------------------------------------------------

@pytest.mark.parametrize("j", [0.4, 0.9])
def test_colour_jitter_equals_pil(j):
    """PILColorJitter on a uint8 tensor gives exactly torchvision's ColorJitter on the PIL image
    (PIL's ImageEnhance), for the same seeds: same order, factors and integer arithmetic. j = 0.9
    reaches factors near 0 and 1.9 (clipping at 0 and 255)."""
    jitter, ref = data.PILColorJitter(j, j, j), transforms.ColorJitter(brightness=j, contrast=j, saturation=j)
    for seed in range(30):
        img = photo(37 + seed, 29, seed)
        torch.manual_seed(seed)
        want = transforms.functional.pil_to_tensor(ref(img)).float()
        torch.manual_seed(seed)
        got = jitter(transforms.functional.pil_to_tensor(img))
        assert got.dtype == torch.float32 and torch.equal(got, want), (seed, (got - want).abs().max())


def test_colour_jitter_steps_by_hand():
    """One image, fixed factors, against PIL's ImageEnhance called directly (not through
    torchvision) and against the formula degenerate + f * (x - degenerate), truncated."""
    img = photo(20, 12, 3)
    x = transforms.functional.pil_to_tensor(img)
    gen = torch.Generator().manual_seed(0)
    for order in ([0, 1, 2, 3], [2, 1, 0, 3], [1, 3, 2, 0]):
        b, c, s = (float(torch.empty(1).uniform_(0.6, 1.4, generator=gen)) for _ in range(3))
        jitter = data.PILColorJitter(0.4, 0.4, 0.4)
        jitter.ref.get_params = lambda *a, order=order, b=b, c=c, s=s: (torch.tensor(order), b, c, s, None)
        want = img
        for fn in order:
            enh = {0: (ImageEnhance.Brightness, b), 1: (ImageEnhance.Contrast, c), 2: (ImageEnhance.Color, s)}.get(fn)
            if enh:
                want = enh[0](want).enhance(enh[1])
        assert torch.equal(jitter(x), transforms.functional.pil_to_tensor(want).float())
    # Brightness alone, by the formula: trunc(clip(f * x)) (f = 1.25: f * x is exact, some clip).
    jitter.ref.get_params = lambda *a: (torch.tensor([0, 3, 1, 2]), 1.25, None, None, None)
    arr = np.asarray(img).astype(np.float64)
    assert (arr * 1.25 > 255).any()
    assert torch.equal(jitter(x), torch.from_numpy(np.floor(np.clip(arr * 1.25, 0, 255))).permute(2, 0, 1).float())
    with pytest.raises(TypeError, match="uint8"):
        jitter(x.float())


# --- whole pipelines against an explicit computation ----------------------------------------------

def _fb_by_hand(img: Image.Image, seed: int, size: int, area: float) -> torch.Tensor:
    """fb.resnet.torch's augmentation written out with PIL and numpy, drawing the random numbers
    in the pipeline's order: crop box, jitter order + factors, lighting alpha, flip."""
    torch.manual_seed(seed)
    top, left, h, w = transforms.RandomResizedCrop.get_params(img, [area, 1.0], [3 / 4, 4 / 3])
    x = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    order = torch.randperm(4).tolist()
    factors = [float(torch.empty(1).uniform_(0.6, 1.4)) for _ in range(3)]
    for fn in order:
        if fn < 3:
            x = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[fn](x).enhance(factors[fn])
    arr = np.asarray(x).astype(np.float32) / 255
    alpha = (torch.randn(3) * 0.1).numpy()
    arr = arr + (np.array(EIGVEC, dtype=np.float32) * alpha * np.array(EIGVAL, dtype=np.float32)).sum(1)
    arr = (arr - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    if torch.rand(1) < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def test_fb_training_samples_match_an_explicit_computation(tmp_path):
    """decoder=pil equals the hand-written augmentation; decoder=tensor differs from it only by the
    resize's rounding: no level off by more than 6 of 255, mean |difference| below 0.1 level and no
    bias (a different crop, flip, jitter or lighting would be off by tens of levels)."""
    size, area = 48, 0.08
    diffs = []
    for k in range(6):
        path = save(photo(120 + 7 * k, 90, k), tmp_path / f"{k}.jpg")
        decoded = data.pil_read_image(path)
        img = Image.open(path).convert("RGB")
        for d in ("pil", "tensor"):
            tf = data.train_transform(data_cfg(image_size=size, min_crop_area=area, decoder=d))
            for seed in range(4):
                want = _fb_by_hand(img, 100 * k + seed, size, area)
                torch.manual_seed(100 * k + seed)
                got = tf(data.image_loader(d)(path))
                assert got.shape == (3, size, size) and got.dtype == torch.float32
                if d == "pil":
                    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
                else:
                    diffs.append(levels(got - want).flatten())
        assert torch.equal(data.read_image(path), decoded)
    diff = torch.cat(diffs)
    assert diff.abs().max() <= 6 and diff.abs().mean() < 0.1 and abs(diff.mean()) < 0.02, \
        (diff.abs().max(), diff.abs().mean(), diff.mean())
    assert (diff.abs() > 0.5).float().mean() < 0.1  # most values are equal


@pytest.mark.parametrize("decoder", ["pil", "tensor"])
def test_validation_transform_by_hand(tmp_path, decoder):
    """Shorter side already at val_resize: no resampling, only the centre crop (offset
    round((20 - 16) / 2) = 2 columns), ToTensor and normalization, computed by hand."""
    path = save(photo(20, 16, 1), tmp_path / "v.jpg")
    arr = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    want = (arr[:, 2:18] / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    got = data.val_transform(data_cfg(image_size=16, val_resize=16, decoder=decoder))(data.image_loader(decoder)(path))
    assert got.shape == (3, 16, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(want).permute(2, 0, 1), rtol=0, atol=1e-6)


def test_validation_resize_differs_by_rounding_only(tmp_path):
    """Resize 256 / centre crop 224 scaled down (resize 40, crop 35) of 4:3 JPEGs: the decoders
    differ by at most one level of 255, on few values."""
    diffs = []
    for k in range(4):
        path = save(photo(100, 75, k), tmp_path / f"{k}.jpg")
        out = [data.val_transform(data_cfg(image_size=35, val_resize=40, decoder=d))(data.image_loader(d)(path))
               for d in ("pil", "tensor")]
        diffs.append(levels(out[1] - out[0]).flatten())
    diff = torch.cat(diffs)
    assert diff.abs().max() < 1 + 1e-3 and (diff.abs() > 0.5).float().mean() < 0.05


def test_constant_image_normalizes_exactly(tmp_path):
    """A flat colour stays flat through any crop, resize and flip: without jitter and lighting the
    training sample is ((c / 255) - mean) / std with c the decoded colour, for both decoders."""
    path = save(Image.new("RGB", (64, 48), (200, 120, 40)), tmp_path / "flat.jpg")
    c = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)[0, 0]
    want = ((c / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32))[:, None, None]
    for d in ("pil", "tensor"):
        tf = data.train_transform(data_cfg(image_size=24, color_jitter=0.0, lighting=0.0, decoder=d))
        for seed in range(5):
            torch.manual_seed(seed)
            x = tf(data.image_loader(d)(path))
            torch.testing.assert_close(x, torch.from_numpy(want).expand(3, 24, 24), rtol=0, atol=1e-6)


# --- the decoder -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"),
                                      ("P", "PNG"), ("RGB", "BMP")])
def test_read_image_equals_pil_decoding(tmp_path, mode, fmt):
    """torchvision.io's decode (JPEG, PNG) and the PIL fallback (BMP) give PIL's RGB pixels."""
    path = save(photo(33, 21, 2, mode), tmp_path / f"x.{fmt.lower()}", fmt)
    want = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    got = data.read_image(path)
    assert got.dtype == torch.uint8 and torch.equal(got, want)


def test_unreadable_files_behave_as_with_pil(tmp_path, caplog):
    """A truncated JPEG and a non-image raise OSError as PIL's loader does, so the ImageFolder
    logs them and serves the next readable image."""
    good = io.BytesIO()
    photo(40, 30, 0).save(good, "JPEG", quality=90)
    folder = tmp_path / "f" / "c0"
    folder.mkdir(parents=True)
    (folder / "0_trunc.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "1_text.jpg").write_bytes(b"not an image" * 20)
    (folder / "2_good.jpg").write_bytes(good.getvalue())
    for bad in ("0_trunc.jpg", "1_text.jpg"):
        with pytest.raises(OSError):
            data.read_image(str(folder / bad))
        with pytest.raises(OSError):
            data.image_loader("pil")(str(folder / bad))
    ds = data.RobustImageFolder(str(tmp_path / "f"), None, loader=data.read_image)
    img, label = ds[0]
    assert torch.equal(img, data.pil_read_image(str(folder / "2_good.jpg"))) and label == 0
    assert "unreadable image" in caplog.text and "0_trunc.jpg" in caplog.text


# --- the ImageFolder pipelines end to end ------------------------------------------------------------

def _stream_batches(cfg_data, n=3, seed=3):
    tr, val, _ = data.build_datasets(cfg_data, seed=seed)
    stream = iter(data.TrainStream(tr, cfg_data, seed, 0, 1, torch.device("cpu")))
    return [next(stream) for _ in range(n)] + [[torch.stack([val[i][0] for i in range(len(val))])]]


def test_cache_and_workers_give_the_same_tensor_samples(tmp_path):
    """decoder=tensor keeps the guarantees of the pil pipeline: data.cache_images and worker
    processes do not change the samples; and its crop_flip samples equal the pil decoder's up to
    one level of 255 (the 20 -> 12 px resize), so every crop offset and flip agrees."""
    root = make_image_folder(tmp_path / "img", classes=2, train_per_class=4, val_per_class=2, size=20)
    base = {"name": "imagefolder", "root": root, "image_size": 12, "val_resize": 12, "augment": "crop_flip",
            "crop_padding": 2, "workers": 0, "batch_size": 4}
    runs = {}
    for name, extra in {"tensor": {}, "tensor_cache": {"cache_images": True}, "tensor_workers": {"workers": 2},
                        "pil": {"decoder": "pil"}}.items():
        runs[name] = _stream_batches(config.load({"data": {**base, **extra}}).data)
    for other in ("tensor_cache", "tensor_workers"):
        for a, b in zip(runs["tensor"], runs[other]):
            for x, y in zip(a, b):
                assert torch.equal(x, y), other
    for a, b in zip(runs["tensor"], runs["pil"]):
        assert levels(a[0] - b[0]).abs().max() < 1 + 1e-3
        if len(a) > 1:
            assert torch.equal(a[1], b[1])  # labels


def test_a_script_holding_a_stream_with_workers_exits(tmp_path):
    """A stream still alive at interpreter exit (here a global) has workers that ignore SIGTERM;
    the process must still exit, and with status 0 (mabn.engine.data's exit hook kills them)."""
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent("""
        import torch
        from mabn.engine import config, data
        cfg = config.load({"data": {"name": "synthetic", "image_size": 8, "train_size": 16, "val_size": 4,
                                    "batch_size": 4, "workers": 2}}).data
        train, _, _ = data.build_datasets(cfg, seed=0)
        stream = iter(data.TrainStream(train, cfg, 0, 0, 1, torch.device("cpu")))
        batches = [next(stream) for _ in range(2)]
        print("read", len(batches), "batches")
    """))
    r = run_script([PYTHON, str(script)])
    assert r.returncode == 0 and "read 2 batches" in r.stdout, r.stderr[-3000:]


def test_default_decoder_and_validation(tmp_path):
    assert config.load({}).data.decoder == "tensor"
    with pytest.raises(config.ConfigError, match=r"data\.decoder='jpeg' is not one of \['tensor', 'pil'\]"):
        config.load({"data": {"decoder": "jpeg"}})
    r = run_script([PYTHON, "train_imagenet.py", "data.decoder=jpeg", f"out_dir={tmp_path / 'x'}"])
    assert r.returncode == 2 and "data.decoder" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "x").exists()


# --- scripts/bench_data.py ---------------------------------------------------------------------------

def test_bench_data_runs_and_converts_rates_into_cores(tmp_path):
    out = tmp_path / "speed.md"
    r = run_script([PYTHON, "scripts/bench_data.py", "--images", "3", "--repeats", "1", "--warmup", "0",
                    "--image-size", "32", "--val-resize", "36", "--gpu-images-per-s", "1000", "90",
                    "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "CPU:" in text and "torchvision" in text and "ASSUMPTION" in text
    train = re.search(r"^\| train, .*?\| (\d+) \[.*?\| (\d+) \[", text, re.M)
    ips = {"pil": float(train.group(1)), "tensor": float(train.group(2))}
    for rate in (1000, 90):
        row = re.search(rf"^\| {rate:,} \| (\d+) \(([\d.]+)\) \| (\d+) \(([\d.]+)\) \|", text, re.M)
        assert row, text
        for k, cores, frac in (("pil", row.group(1), row.group(2)), ("tensor", row.group(3), row.group(4))):
            # cores = rate / per-process images/s, rounded up; the table prints images/s rounded
            # to whole numbers and the ratio to one decimal, hence the tolerances
            want = rate / ips[k]
            assert abs(float(frac) - want) <= 0.05 + 0.01 * want, (k, rate, frac, want)
            assert math.ceil(float(frac) - 0.05) <= int(cores) <= math.ceil(float(frac) + 0.05)
    assert re.search(r"^\| train \| [+-]", text, re.M)
    for args, key in ((["--images", "0"], "--images"), (["--images-from", str(tmp_path / "none")], "--images-from")):
        bad = run_script([PYTHON, "scripts/bench_data.py", *args])
        assert bad.returncode == 2 and key in bad.stderr.splitlines()[-1], bad.stderr[-2000:]
    assert os.listdir(tmp_path) == ["speed.md"]
