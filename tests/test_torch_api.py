"""The layer behaves like a torch.nn layer: alpha vs torch's momentum, keyword-only options,
factory arguments, state_dict compatibility with nn.BatchNorm2d, model conversion.

Numbers are checked against explicit float64 formulas (eq. 12, eq. 15) or stock torch layers."""

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn

import mabn
from mabn import BatchStatNorm2d

D = torch.float64


def chi2(x):
    """Per-channel E[x^2] of a 4-D input (eq. 15), float64."""
    return x.double().pow(2).mean((0, 2, 3))


# --------------------------------------------------------------------------- alpha / momentum
def test_mabn_momentum_has_torch_meaning():
    """MABN2d(c, momentum=0.1) keeps 0.9 of the OLD value, as nn.BatchNorm2d(c, momentum=0.1)."""
    layer = mabn.MABN2d(3, momentum=0.1, renorm_warmup_iters=0).double()
    assert layer.alpha == pytest.approx(0.9) and layer.momentum == pytest.approx(0.1)
    assert mabn.MABN2d(3).alpha == 0.98 and mabn.MABN2d(3, alpha=0.5).alpha == 0.5
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(4, 3, 5, 5, generator=g, dtype=D) * 2 + 1 for _ in range(2))
    layer(x1)  # ema_init="first": the EMA starts at the first value
    layer(x2)
    torch.testing.assert_close(layer.running_var, 0.9 * chi2(x1) + 0.1 * chi2(x2), rtol=0, atol=1e-12)
    # The same call on the BN preset gives nn.BatchNorm2d's running statistics.
    ours, ref = mabn.BatchNorm2d(3, momentum=0.3).double(), nn.BatchNorm2d(3, momentum=0.3).double()
    for x in (x1, x2):
        ours(x), ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=1e-13)


def test_momentum_property_sets_alpha():
    layer = mabn.MABN2d(3)
    layer.momentum = 0.25
    assert layer.alpha == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"momentum=0\.0 must be in \(0, 1\]"):
        layer.momentum = 0.0


def test_pickled_modules_keep_alpha():
    layer = mabn.MABN2d(3, alpha=0.97)
    assert pickle.loads(pickle.dumps(layer)).alpha == 0.97
    old = layer.__dict__.copy()  # a module pickled before version 2 kept alpha under "momentum"
    old["momentum"] = old.pop("alpha")
    restored = mabn.MABN2d.__new__(mabn.MABN2d)
    restored.__setstate__(old)
    assert restored.alpha == 0.97 and restored.momentum == pytest.approx(0.03)


def test_options_after_num_features_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        BatchStatNorm2d(4, 1e-5)  # nn.BatchNorm2d's second argument is eps; ours are keywords
    with pytest.raises(TypeError, match="positional"):
        mabn.MABN2d(4, 2)


def test_device_and_dtype_factory_arguments():
    layer = mabn.MABN2d(8, dtype=D)
    assert all(t.dtype == D for n, t in layer.state_dict().items() if not n.startswith("num_"))
    assert layer.num_batches_tracked.dtype == torch.long
    meta = mabn.MABN2d(1024, norm_batch_size=2, device="meta")
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    real = meta.to_empty(device="cpu")
    real.reset_parameters()
    fresh = mabn.MABN2d(1024, norm_batch_size=2)
    for name, t in fresh.state_dict().items():
        assert torch.equal(real.state_dict()[name], t), name


# --------------------------------------------------------------------------- state_dict
def _trained_bn(c=4):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        bn(torch.randn(6, c, 3, 3, generator=g) * 3 + 2)
    return bn.eval()


def test_stock_batchnorm_state_dict_loads_strictly():
    bn = _trained_bn()
    sd = bn.state_dict()
    # Vanilla family layer: the same eval map.
    ours = BatchStatNorm2d(4)
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(ours.eval()(x), bn(x), rtol=0, atol=0)
    assert int(ours.num_batches_tracked) == 3
    # MABN: the MABN-only buffers start fresh; chi^2 = var + mean^2, running_mean 0 (eq. 15).
    layer = mabn.MABN2d(4, norm_batch_size=2)
    layer.load_state_dict(sd, strict=True)
    fresh = mabn.MABN2d(4, norm_batch_size=2)
    for name in BatchStatNorm2d.MABN_BUFFERS:
        assert torch.equal(getattr(layer, name), getattr(fresh, name)), name
    assert torch.equal(layer.weight, bn.weight) and torch.equal(layer.bias, bn.bias)
    torch.testing.assert_close(layer.running_var, bn.running_var + bn.running_mean ** 2)
    assert torch.equal(layer.running_mean, torch.zeros(4))
    # A state_dict of torch before BatchNorm's version 2 (no num_batches_tracked) loads too.
    old = {k: v for k, v in sd.items() if k != "num_batches_tracked"}
    old = type(sd)(old)
    old._metadata = {"": {"version": 1}}
    layer.load_state_dict(old, strict=True)
    assert int(layer.num_batches_tracked) == 0


def test_partial_state_dict_is_still_reported():
    sd = mabn.MABN2d(4).state_dict()
    del sd["fp_window"]
    with pytest.raises(RuntimeError, match="Missing key.*fp_window"):
        mabn.MABN2d(4).load_state_dict(sd, strict=True)


def test_mabn_state_dict_round_trip_and_export_to_stock_batchnorm():
    layer = mabn.MABN2d(3, norm_batch_size=2, buffer_size=4, renorm_warmup_iters=1)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        layer(torch.randn(4, 3, 5, 5, generator=g)).sum().backward()
    # Its own state_dict round-trips exactly (windows included).
    copy_ = mabn.MABN2d(3, norm_batch_size=2, buffer_size=4, renorm_warmup_iters=1)
    copy_.load_state_dict(layer.state_dict(), strict=True)
    for name, t in layer.state_dict().items():
        assert torch.equal(copy_.state_dict()[name], t), name
    # Into a stock nn.BatchNorm2d through the export helper: the same eval output.
    model = nn.Sequential(nn.Conv2d(2, 3, 3), layer).eval()
    stock = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).eval()
    stock.load_state_dict(mabn.export_torchvision_state_dict(model), strict=True)
    x = torch.randn(2, 2, 7, 7)
    torch.testing.assert_close(stock(x), model(x), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- conversion
class MyBN(nn.BatchNorm2d):
    pass


def _zoo():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3),
                      nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4, momentum=None),
                      nn.Conv2d(4, 5, 1), MyBN(5, affine=False),
                      nn.BatchNorm1d(5), nn.BatchNorm3d(5))
    with torch.no_grad():
        for bn in (m[1], m[3], m[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-1, 1)
    return m


def test_convert_model_every_2d_batchnorm_keeps_state_not_momentum():
    m = _zoo().double()
    old = copy.deepcopy(m)
    mabn.convert_model(m, dict(form="vanilla", fp_stats="batch", bp_stats="batch", norm_batch_size=None))
    assert [type(x) for x in m][1::2] == [BatchStatNorm2d] * 3 + [nn.BatchNorm3d]
    assert type(m[6]) is nn.BatchNorm1d
    assert m[1].alpha == 0.98  # the default (MABN2d's alpha), not 1 - the source momentum 0.3
    assert m[3].alpha == 0.98  # momentum=None (cumulative average): the same default
    for i in (1, 3, 5):
        assert m[i].weight.dtype == D
        torch.testing.assert_close(m[i].running_mean, old[i].running_mean, rtol=0, atol=0)
        torch.testing.assert_close(m[i].running_var, old[i].running_var, rtol=0, atol=0)
    assert torch.equal(m[1].weight, old[1].weight) and torch.equal(m[5].weight, torch.ones(5, dtype=D))
    # The same eval map as the stock layers.
    m.eval(), old.eval()
    x = torch.randn(2, 3, 4, 4, dtype=D)
    torch.testing.assert_close(m[:6](x), old[:6](x), rtol=0, atol=1e-12)
    # An explicit alpha wins; the modified form gets chi^2 = var + mean^2.
    m2 = mabn.convert_model(copy.deepcopy(old), dict(form="modified", alpha=0.98))
    assert m2[1].alpha == 0.98 and torch.equal(m2[1].running_mean, torch.zeros(4, dtype=D))
    torch.testing.assert_close(m2[1].running_var, old[1].running_var + old[1].running_mean ** 2)


def test_convert_is_idempotent_and_classmethod():
    m = mabn.MABN2d.convert_batchnorm(_zoo(), norm_batch_size=2)
    assert isinstance(m[1], mabn.MABN2d) and m[1].alpha == 0.98  # the preset's, not 1 - 0.3
    assert mabn.MABN2d.convert_batchnorm(_zoo(), alpha=0.98)[1].alpha == 0.98
    assert mabn.MABN2d.convert_batchnorm(_zoo(), momentum=0.1)[1].alpha == pytest.approx(0.9)
    m[:6](torch.randn(4, 3, 4, 4)).sum().backward()  # the windows now hold values
    state = copy.deepcopy(m.state_dict())
    for again in (mabn.MABN2d.convert_batchnorm(m), mabn.convert_model(m, dict(form="vanilla"))):
        assert again is m
    assert [type(x) for x in m][1::2] == [mabn.MABN2d] * 3 + [nn.BatchNorm3d]
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    # The layer itself: the new layer is returned, like convert_sync_batchnorm.
    single = mabn.BatchRenorm2d.convert_batchnorm(nn.BatchNorm2d(4))
    assert type(single) is mabn.BatchRenorm2d and single.alpha == pytest.approx(0.9)


def test_convert_torchvision_and_cifar_resnets():
    from mabn.engine.models import CifarResNet

    for model in (torchvision.models.resnet18(num_classes=3), CifarResNet(20, 3)):
        n_bn = sum(isinstance(x, nn.BatchNorm2d) for x in model.modules())
        mabn.convert_model(model, dict(form="modified", fp_stats="ema", bp_stats="sma",
                                       norm_batch_size=2, alpha=0.98), weight_centralization=True)
        assert sum(isinstance(x, BatchStatNorm2d) for x in model.modules()) == n_bn
        assert not any(type(x) in (nn.BatchNorm2d, nn.Conv2d) for x in model.modules())
        model(torch.randn(4, 3, 32, 32)).sum().backward()


def test_convert_refuses_an_uninitialized_lazy_batchnorm():
    with pytest.raises(ValueError, match="uninitialized lazy LazyBatchNorm2d"):
        mabn.convert_model(nn.Sequential(nn.LazyBatchNorm2d()), dict())


def test_build_norm_takes_alpha_not_momentum():
    with pytest.raises(ValueError, match="torch's momentum is 1 - alpha"):
        mabn.build_norm(4, momentum=0.1)
    bn = mabn.build_norm(4, layer="syncbn", alpha=0.98)
    assert bn.momentum == pytest.approx(0.02)
    with pytest.raises(ValueError, match=r"alpha=1\.5 must be in \[0, 1\)"):
        mabn.build_norm(4, layer="bn", alpha=1.5)
    layer = mabn.build_norm(4, dtype=D, device="meta")
    assert layer.weight.dtype == D and layer.weight.device.type == "meta"
