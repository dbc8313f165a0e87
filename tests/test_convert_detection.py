"""Converting and folding beyond classifiers: the converters' defaults (MABN), their alpha rule and
messages, the trainer's presets kept as they were, and folding torchvision detectors."""

import copy
import glob
import logging
import os

import pytest
import torch
import yaml
from torch import nn

import mabn
from mabn import backends
from mabn.engine.config import NormConfig

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import MaskRCNN, RetinaNet  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads  # noqa: E402
from torchvision.models.detection.retinanet import RetinaNetHead  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

D = torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The MABN2d preset, written out (section 4, appendix B.2, the authors' code).
MABN = dict(form="modified", fp_stats="ema", bp_stats="sma", norm_batch_size=None, alpha=0.98,
            buffer_size=16, eps=1e-5, r_max=5.0, d_max=5.0, warmup_iters=0, renorm_warmup_iters=100,
            ema_init="first")


def _net(momentum=0.1):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6, momentum=momentum)))


def _messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == "mabn.convert" and r.levelno == level]


# --------------------------------------------------------------------------- defaults and alpha
def test_convert_model_and_build_norm_default_to_mabn(caplog):
    caplog.set_level(logging.INFO, logger="mabn.convert")
    m = mabn.convert_model(_net(), dict(norm_batch_size=2))
    for layer in (m[1], m[3][1]):
        assert type(layer) is mabn.BatchStatNorm2d
        assert layer.option_values() == {**MABN, "norm_batch_size": 2}
    assert mabn.build_norm(8).option_values() == MABN
    assert mabn.build_norm(8, norm_batch_size=4, alpha=None).option_values() == {**MABN, "norm_batch_size": 4}
    (line,) = _messages(caplog, logging.INFO)
    assert "convert_model: replaced 2 BatchNorm layer(s) by BatchStatNorm2d(form='modified'" in line
    assert "ema_init='first')" in line and "alpha=0.98 (MABN2d's default)" in line
    assert "momentum (0.1;" in line and "was NOT used" in line


@pytest.mark.parametrize("cls,alpha", [(mabn.MABN2d, 0.98), (mabn.BatchNorm2d, 0.9),
                                       (mabn.BatchRenorm2d, 0.9), (mabn.ModifiedBatchNorm2d, 0.9)])
def test_convert_batchnorm_alpha_is_the_presets_unless_given(cls, alpha, caplog):
    caplog.set_level(logging.INFO, logger="mabn.convert")
    assert cls.convert_batchnorm(_net(momentum=0.3))[1].alpha == alpha  # not 1 - 0.3
    assert "momentum (0.3;" in _messages(caplog, logging.INFO)[-1]
    assert cls.convert_batchnorm(_net(momentum=0.3), alpha=0.95)[3][1].alpha == 0.95
    assert "alpha=0.95 (given)" in _messages(caplog, logging.INFO)[-1]
    assert cls.convert_batchnorm(_net(momentum=0.3), momentum=0.2)[1].alpha == pytest.approx(0.8)
    same = cls.convert_batchnorm(_net(momentum=round(1 - alpha, 2)))
    assert same[1].alpha == alpha and "NOT used" not in _messages(caplog, logging.INFO)[-1]
    assert len(_messages(caplog, logging.INFO)) == 4  # one line per conversion call


def test_convert_model_alpha_rule_for_torch_layers(caplog):
    caplog.set_level(logging.INFO, logger="mabn.convert")
    bn = mabn.convert_model(_net(momentum=0.3), dict(layer="bn"))[1]
    assert type(bn) is nn.BatchNorm2d and bn.momentum == pytest.approx(0.1)
    assert "NOT used" in _messages(caplog, logging.INFO)[-1]
    assert mabn.convert_model(_net(momentum=0.3), dict(layer="syncbn", alpha=0.7))[1].momentum == pytest.approx(0.3)


def test_unconverted_batchnorms_are_logged_as_a_warning(caplog):
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(4)
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm3d(4)), frozen)
    for convert in (lambda m: mabn.convert_model(m, dict(norm_batch_size=2)), mabn.MABN2d.convert_batchnorm):
        caplog.clear()
        m = convert(copy.deepcopy(model))
        assert type(m[0]) is mabn.BatchStatNorm2d or type(m[0]) is mabn.MABN2d
        assert [type(x) for x in (m[1][0], m[1][1], m[2])] == [nn.BatchNorm1d, nn.BatchNorm3d, type(frozen)]
        (line,) = _messages(caplog, logging.WARNING)
        assert "3 normalization layer(s) left unconverted" in line
        for name in ("1.0 (BatchNorm1d)", "1.1 (BatchNorm3d)", "2 (FrozenBatchNorm2d)"):
            assert name in line
    caplog.clear()
    mabn.convert_model(_net(), dict())
    assert _messages(caplog, logging.WARNING) == []


# --------------------------------------------------------------------------- batch-size error
@pytest.mark.parametrize("backend", list(backends.BACKENDS))
def test_indivisible_batch_names_the_layer_and_the_fix(backend):
    model = mabn.convert_model(torchvision.models.resnet18(num_classes=3), dict(norm_batch_size=2))
    assert model.layer1[0].bn1.qualified_name == "layer1.0.bn1"
    assert not any("qualified_name" in k for k in model.state_dict())
    with backends.forced(backend), pytest.raises(ValueError) as info:
        model.layer1(torch.randn(3, 64, 8, 8))
    msg = str(info.value)
    assert msg.startswith("layer1.0.bn1: batch size 3 is not divisible by norm_batch_size=2")
    assert "drop_last=True" in msg and "norm_batch_size=None" in msg
    lone = mabn.MABN2d(4, norm_batch_size=4)
    with backends.forced(backend), pytest.raises(ValueError, match=r"^MABN2d\(4, form=modified.*not divisible"):
        lone(torch.randn(6, 4, 2, 2))


# --------------------------------------------------------------------------- trainer presets
def _expected_norm(path):
    """The norm config of a preset read from its YAML files (the NormConfig defaults, the norm
    preset, the experiment's overrides), independently of Hydra and of the trainer's code."""
    doc = yaml.safe_load(open(path))
    if "/norm/" in path:
        preset, overrides = doc, {}
    else:
        name = next(d["override /norm"] for d in doc["defaults"] if "override /norm" in d)
        preset, overrides = yaml.safe_load(open(f"{REPO}/configs/norm/{name}.yaml")), doc.get("norm", {})
    return {**NormConfig().__dict__, **preset, **overrides}


PRESETS = sorted(glob.glob(f"{REPO}/configs/norm/*.yaml")) + sorted(glob.glob(f"{REPO}/configs/experiment/*.yaml"))


def test_trainer_presets_build_the_layers_their_config_names(tmp_path):
    """Every norm and experiment preset's model: each normalization is the config's layer with
    exactly the config's options (the converters' defaults never fill in a value)."""
    from _train_utils import load_cfg
    from mabn.engine import models

    (tmp_path / "train").mkdir(), (tmp_path / "val").mkdir()
    classes = {"batchstat": mabn.BatchStatNorm2d, "bn": nn.BatchNorm2d, "syncbn": mabn.SyncBatchNorm2d,
               "gn": nn.GroupNorm}
    for path in PRESETS:
        group, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)[:-5]
        extra = ["device=cuda"] if name == "syncbn" else [] if group == "norm" else [f"data.root={tmp_path}"]
        cfg = load_cfg([f"{group}={name}"] + extra)
        want = _expected_norm(path)
        norms = [m for m in models.build_model(cfg.model, cfg.norm, 10).modules()
                 if isinstance(m, (mabn.BatchStatNorm2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))]
        assert norms and all(type(m) is classes[want["layer"]] for m in norms), path
        for m in norms:
            if want["layer"] == "batchstat":
                assert m.option_values() == {k: want[k] for k in mabn.norm.OPTION_NAMES}, path
            elif want["layer"] == "gn":
                assert (m.num_groups, m.eps) == (want["num_groups"], want["eps"]), path
            else:
                assert (m.momentum, m.eps) == pytest.approx((1 - want["alpha"], want["eps"])), path


# --------------------------------------------------------------------------- folding detectors
def _randomize_norms(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, mabn.BatchStatNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def _check_folded_equal(model, images):
    """Fold ``model`` (eval, float64): same detections, and no normalization left."""
    folded, report = mabn.fold_model(model, return_report=True)
    assert report.left == {} and report.complete
    assert len(report.folded) == sum(isinstance(m, mabn.BatchStatNorm2d) for m in model.modules())
    assert not any(isinstance(m, (mabn.BatchStatNorm2d, nn.modules.batchnorm._BatchNorm, mabn.CenConv2d))
                   for m in folded.modules())
    with torch.no_grad():
        want, got = model(images), folded(images)
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and a["boxes"].shape[0] > 0
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-9)
    return report


def _backbone(**kwargs):
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                               trainable_layers=5, **kwargs)


@pytest.mark.parametrize("heads", [False, True], ids=["backbone_norms", "head_norms_too"])
def test_fold_mask_rcnn(heads):
    torch.manual_seed(0)
    extra = {}
    if heads:
        extra = dict(box_head=FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d),
                     mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=nn.BatchNorm2d))
    model = MaskRCNN(_backbone(), num_classes=3, min_size=64, max_size=64, rpn_post_nms_top_n_test=8,
                     box_detections_per_img=3, box_score_thresh=0.0, **extra)
    mabn.convert_model(model, dict(norm_batch_size=2), weight_centralization=True)
    _randomize_norms(model)
    report = _check_folded_equal(model.double().eval(), [torch.rand(3, 64, 64, dtype=D) for _ in range(2)])
    assert "" in report.untraced and "Proxy object cannot be iterated" in report.untraced[""]
    assert "backbone" in report.traced and "backbone.body.layer1.0.bn1" in report.folded
    if heads:
        assert {"roi_heads.box_head", "roi_heads.mask_head"} <= set(report.traced)
        assert report.folded["roi_heads.mask_head.0.1"] == "roi_heads.mask_head.0.0"


def test_fold_retinanet_with_head_norms():
    torch.manual_seed(0)
    backbone = _backbone(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    head = RetinaNetHead(256, 9, 3, norm_layer=nn.BatchNorm2d)
    model = RetinaNet(backbone, num_classes=3, min_size=64, max_size=64, head=head,
                      detections_per_img=5, score_thresh=0.0)
    mabn.convert_model(model, dict(norm_batch_size=2))
    _randomize_norms(model)
    report = _check_folded_equal(model.double().eval(), [torch.rand(3, 64, 64, dtype=D) for _ in range(2)])
    assert {"head.classification_head.conv", "head.regression_head.conv"} <= set(report.traced)


def test_fold_reports_and_logs_norms_in_untraceable_code(caplog):
    class Loop(nn.Module):  # iterates over its input: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.tower = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, xs):
            return [self.tower(self.bn(self.conv(x))) for x in xs]

    model = mabn.convert_model(Loop(), dict(norm_batch_size=2))
    _randomize_norms(model)
    model = model.double().eval()
    caplog.set_level(logging.WARNING, logger="mabn.fold")
    folded, report = mabn.fold_model(model, return_report=True)
    assert report.folded == {"tower.1": "tower.0"} and list(report.left) == ["bn"]
    assert "torch.fx cannot trace" in report.left["bn"] and not report.complete
    assert type(folded.bn) is nn.BatchNorm2d  # no mabn class left
    (line,) = [r.getMessage() for r in caplog.records if r.name == "mabn.fold"]
    assert "1 normalization layer(s) NOT folded" in line and "\n  bn: " in line
    xs = [torch.randn(2, 3, 4, 4, dtype=D)]
    with torch.no_grad():
        torch.testing.assert_close(folded(xs)[0], model(xs)[0], rtol=1e-12, atol=1e-12)
    assert type(mabn.fold_model(model)) is Loop  # without the report: the model alone
