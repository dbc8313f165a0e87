"""The reference small-scale protocol's pieces: the CIFAR-style ResNets, the lr policies, the
crop+flip augmentation and its image cache, each against an independent computation."""

import math

import pytest
import torch
from torch import nn

import mabn
from mabn.engine import config, data, models, trainer

from _train_utils import make_image_folder


def test_cifar_resnet_shape_names_and_parameter_count():
    m = models.CifarResNet(20, num_classes=10)
    # He et al. (2016) sec. 4.2: 6n + 2 layers; n = 3 basic blocks per stage for ResNet-20.
    assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) + 1 == 20  # 19 3x3 convolutions + the fc layer (shortcuts are not counted)
    # Parameters by hand: stem 3*16*9 + BN 2*16; stage widths 16, 32, 64 with 3 blocks of two 3x3
    # convs + BNs; 1x1 projections (16->32, 32->64) with BN; fc 64*10 + 10.
    def block(cin, cout):
        return cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout
    expected = 3 * 16 * 9 + 32
    expected += 3 * block(16, 16)
    expected += block(16, 32) + 2 * block(32, 32) + 16 * 32 + 2 * 32
    expected += block(32, 64) + 2 * block(64, 64) + 32 * 64 + 2 * 64
    expected += 64 * 10 + 10
    assert sum(p.numel() for p in m.parameters()) == expected
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n"):
        models.CifarResNet(21)


def test_every_normalization_sees_at_least_64_values_per_channel_at_b2():
    """The protocol's condition: n = b * H * W >= 64 for every normalized layer, groups of b = 2,
    32 px inputs (the last stage: 2 * 8 * 8 = 128)."""
    cfg = config.load({"model": {"arch": "resnet20"}, "norm": {"norm_batch_size": 2}})
    m = models.build_model(cfg.model, cfg.norm, 10)
    seen = {}
    for name, mod in m.named_modules():
        if isinstance(mod, mabn.BatchStatNorm2d):
            mod.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(
                name, mod.norm_batch_size * inp[0].shape[2] * inp[0].shape[3]))
    m(torch.randn(4, 3, 32, 32))
    assert len(seen) == 19 + 2  # every BN of the stock model was converted
    assert min(seen.values()) == 128 and seen["bn1"] == 2048 and seen["layer3.2.bn2"] == 128


def test_cifar_resnet_converts_folds_and_exports_like_torchvision():
    cfg = config.load({"model": {"arch": "resnet32"},
                       "norm": {"form": "modified", "fp_stats": "ema", "bp_stats": "sma", "norm_batch_size": 2,
                                "alpha": 0.98, "weight_centralization": True}})
    m = models.build_model(cfg.model, cfg.norm, 10)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert sum(isinstance(x, mabn.CenConv2d) for x in m.modules()) == 31 + 2
    m.train()
    for _ in range(3):
        m(torch.randn(8, 3, 32, 32)).sum().backward()
    m.eval()
    x = torch.randn(3, 3, 32, 32)
    ref = m(x)
    torch.testing.assert_close(mabn.fold_model(m)(x), ref, rtol=1e-4, atol=1e-4)
    stock = models.build_stock_model(cfg.model, 10)
    stock.load_state_dict(mabn.export_torchvision_state_dict(m), strict=True)
    torch.testing.assert_close(stock.eval()(x), ref, rtol=1e-4, atol=1e-4)


def _sched(policy, iterations=10, warmup=2, factor=0.1):
    return config.load({"schedule": {"policy": policy, "iterations": iterations, "warmup_iters": warmup,
                                     "warmup_factor": factor, "milestones": []}})


def test_lr_policies_against_explicit_values():
    # T = 10, w = 2, lr 1: warm-up 0.1 then 0.1 + 0.9 * 1/2; afterwards t = (it - 3) / 8.
    lin, cos = _sched("linear"), _sched("cosine")
    assert [trainer.lr_at(lin, i, 1.0) for i in (1, 2)] == pytest.approx([0.1, 0.55])
    assert [trainer.lr_at(cos, i, 1.0) for i in (1, 2)] == pytest.approx([0.1, 0.55])
    assert [trainer.lr_at(lin, i, 1.0) for i in (3, 4, 7, 10)] == pytest.approx([1.0, 0.875, 0.5, 0.125])
    assert [trainer.lr_at(cos, i, 1.0) for i in (3, 7, 10)] == pytest.approx(
        [1.0, 0.5, (1 + math.cos(7 * math.pi / 8)) / 2])
    # Without warm-up the schedule starts at lr and t = (it - 1) / T.
    assert trainer.lr_at(_sched("linear", 4, 0), 4, 0.2) == pytest.approx(0.2 * (1 - 3 / 4))
    # The protocol's schedule: peak at the end of the warm-up, above zero at the last iteration.
    cfg = config.load({"schedule": {"policy": "linear", "iterations": 2400, "warmup_iters": 360,
                                    "milestones": []}})
    lrs = [trainer.lr_at(cfg, i, 0.05) for i in range(1, 2401)]
    assert max(lrs) == pytest.approx(0.05) and lrs.index(max(lrs)) == 360
    assert 0 < lrs[-1] < 0.05 / 2000


@pytest.mark.parametrize("overrides,message", [
    ({"schedule": {"policy": "onecycle"}}, "schedule.policy"),
    ({"schedule": {"iterations": 10, "warmup_iters": 10}}, "schedule.warmup_iters"),
    ({"data": {"augment": "heavy"}}, "data.augment"),
    ({"data": {"cache_images": True}}, "data.cache_images"),
    ({"data": {"augment": "crop_flip", "cache_images": True, "image_size": 32, "val_resize": 36}}, "data.val_resize"),
    ({"model": {"arch": "resnet21"}}, "model.arch"),
])
def test_protocol_options_are_validated(overrides, message):
    with pytest.raises(config.ConfigError, match=message.replace(".", r"\.")):
        config.load(overrides)


@pytest.mark.parametrize("decoder", ["pil", "tensor"])
def test_crop_flip_cache_gives_the_same_samples(tmp_path, decoder):
    """data.cache_images changes where the resize happens and that the crop, flip and
    normalization run on the whole batch (data.CropFlipDraws / CropFlipBatch), not the samples:
    the same seeded stream gives identical batches with and without the cache (train and
    validation) as torchvision's per-sample transforms."""
    root = make_image_folder(tmp_path / "img", classes=2, train_per_class=4, val_per_class=2, size=20)
    base = {"name": "imagefolder", "root": root, "image_size": 12, "val_resize": 12, "augment": "crop_flip",
            "crop_padding": 2, "workers": 0, "batch_size": 4, "decoder": decoder}
    batches = []
    for cache in (False, True):
        cfg = config.load({"data": {**base, "cache_images": cache}})
        tr, val, n = data.build_datasets(cfg.data, seed=3)
        stream = iter(data.TrainStream(tr, cfg.data, 3, 0, 1, torch.device("cpu")))
        batches.append([next(stream) for _ in range(4)] + [[val[i][0] for i in range(len(val))]])
    for a, b in zip(*batches):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    x = batches[1][0][0]
    assert x.shape == (4, 3, 12, 12)
    # The padding shows: some crops of the 12 px image padded by 2 hold zero (normalized) pixels.
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    zero = -mean / std
    assert any(torch.isclose(img, zero.expand_as(img), atol=1e-6).all(0).any() for b in batches[1][:4] for img in b[0])
