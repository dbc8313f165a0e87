"""Folding of eval-mode normalizations into convolutions, and export to stock torchvision models.

Every eval-mode layer of the family is F.batch_norm with its running statistics (a per-channel
affine map), and CenConv2d (eq. 18) is a plain convolution with a centered kernel, so
conv -> norm folds into one nn.Conv2d with bias. These tests check that equivalence numerically
(1e-10 in float64, 1e-5 relative in float32) on buffers produced by real training steps.
"""
import importlib.util

import pytest
import torch
import torchvision
from torch import nn

from mabn import (
    BatchNorm2d,
    BatchRenorm2d,
    BatchStatNorm2d,
    CenConv2d,
    MABN2d,
    ModifiedBatchNorm2d,
    convert_model,
)
from mabn.fold import (
    export_onnx,
    export_torchscript,
    export_torchvision_state_dict,
    fold_conv_norm,
    fold_model,
    plain_model,
)

# name -> factory(num_features); the family layers use normalization groups of 2 samples.
NORMS = {
    "nn.BatchNorm2d": lambda c: nn.BatchNorm2d(c),
    "BatchNorm2d": lambda c: BatchNorm2d(c, norm_batch_size=2),
    "BatchRenorm2d": lambda c: BatchRenorm2d(c, norm_batch_size=2, renorm_warmup_iters=1),
    "ModifiedBatchNorm2d": lambda c: ModifiedBatchNorm2d(c, norm_batch_size=2),
    "MABN2d": lambda c: MABN2d(c, norm_batch_size=2, buffer_size=4, renorm_warmup_iters=1),
    # ablation combinations of the family (Table 4-like): vanilla form with SMA/EMA statistics,
    # modified form with EMA forward statistics and batch backward statistics.
    "vanilla-sma-sma": lambda c: BatchStatNorm2d(c, fp_stats="sma", bp_stats="sma", norm_batch_size=2, buffer_size=4),
    "vanilla-ema-sma": lambda c: BatchStatNorm2d(c, fp_stats="ema", bp_stats="sma", norm_batch_size=2, buffer_size=4),
    "modified-ema-batch": lambda c: BatchStatNorm2d(c, form="modified", fp_stats="ema", norm_batch_size=2),
}


class _ConvNormNet(nn.Module):
    """conv -> norm -> relu -> strided conv with bias -> norm -> relu -> grouped conv -> norm."""

    def __init__(self, norm, cen):
        super().__init__()
        conv = CenConv2d if cen else nn.Conv2d
        self.conv1 = conv(3, 8, 3, padding=1, bias=False)
        self.bn1 = norm(8)
        self.conv2 = conv(8, 16, 3, stride=2, padding=1, bias=True)
        self.bn2 = norm(16)
        self.conv3 = conv(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn3 = norm(16)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


def _train(model, steps=3, batch=4, size=8, lr=0.1):
    """A few SGD steps so that running statistics, SMA windows and affine parameters are
    non-trivial; then the affine parameters are randomised further and the model put in eval."""
    p = next(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, dtype=p.dtype) * 2 + 0.5
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, BatchStatNorm2d)):
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _has_mabn_layers(model):
    return any(isinstance(m, (BatchStatNorm2d, CenConv2d)) for m in model.modules())


@pytest.mark.parametrize("cen", [False, True], ids=["conv", "cenconv"])
@pytest.mark.parametrize("name", list(NORMS))
def test_fold_presets(name, cen):
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = _train(_ConvNormNet(NORMS[name], cen).to(dtype))
        folded = fold_model(model)
        x = torch.randn(3, 3, 8, 8, dtype=dtype)
        with torch.no_grad():
            ref, out = model(x), folded(x)
        assert _rel_err(out, ref) < tol, (dtype, _rel_err(out, ref))
        assert not _has_mabn_layers(folded)
        assert all(isinstance(getattr(folded, f"bn{i}"), nn.Identity) for i in (1, 2, 3))
        assert all(type(getattr(folded, f"conv{i}")) is nn.Conv2d for i in (1, 2, 3))
        assert folded.conv1.bias is not None and folded.conv1.weight.dtype == dtype
        # the original is untouched
        assert isinstance(model.bn1, nn.BatchNorm2d if name == "nn.BatchNorm2d" else BatchStatNorm2d)


def test_modified_form_buffers_are_the_eval_map():
    """For the modified form (eq. 15/19) running_mean stays 0 and running_var is EMA(E[x^2])."""
    torch.manual_seed(0)
    model = _train(_ConvNormNet(NORMS["MABN2d"], True).double())
    assert torch.all(model.bn1.running_mean == 0) and not torch.all(model.bn1.running_var == 1)
    conv = fold_conv_norm(model.conv1, model.bn1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert _rel_err(conv(x), model.bn1(model.conv1(x))) < 1e-12


def _mabn_resnet(arch):
    model = getattr(torchvision.models, arch)()
    convert_model(model, norm=dict(layer="batchstat", form="modified", fp_stats="ema", bp_stats="sma",
                                   norm_batch_size=2, alpha=0.98, buffer_size=4,
                                   renorm_warmup_iters=1),
                  weight_centralization=True)
    return model


def _randomise_stats(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, BatchStatNorm2d)):
                if not (isinstance(m, BatchStatNorm2d) and m.form == "modified"):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model


def test_fold_resnet18_trained_float64():
    torch.manual_seed(0)
    model = _train(_mabn_resnet("resnet18").double(), steps=2, batch=4, size=32, lr=0.01)
    folded = fold_model(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(folded(x), model(x)) < 1e-10
    assert not _has_mabn_layers(folded)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


@pytest.mark.parametrize("norm", ["bn", "mabn"])
def test_fold_resnet50_float64(norm):
    torch.manual_seed(0)
    model = torchvision.models.resnet50() if norm == "bn" else _mabn_resnet("resnet50")
    model = _randomise_stats(model.double()).eval()
    folded = fold_model(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(folded(x), model(x)) < 1e-10
    n_norms = sum(isinstance(m, (nn.BatchNorm2d, BatchStatNorm2d)) for m in model.modules())
    assert n_norms == 53 and sum(isinstance(m, nn.Identity) for m in folded.modules()) == 53
    assert not _has_mabn_layers(folded)


def test_folded_mabn_and_bn_resnets_are_the_same_graph():
    """Same module types, shapes and biases: MABN costs exactly what BN costs at inference."""
    bn = fold_model(torchvision.models.resnet18().eval())
    mb = fold_model(_mabn_resnet("resnet18").eval())
    desc = lambda m: [(n, type(x).__name__, tuple(p.shape for p in x.parameters(recurse=False)))
                      for n, x in m.named_modules()]
    assert desc(bn) == desc(mb)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_export_state_dict_loads_into_torchvision_resnet50(eps):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    convert_model(model, norm=dict(layer="batchstat", form="modified", fp_stats="ema", bp_stats="sma",
                                   norm_batch_size=2, eps=eps), weight_centralization=True)
    model = _randomise_stats(model.double()).eval()
    sd = export_torchvision_state_dict(model)
    stock = torchvision.models.resnet50().double()
    result = stock.load_state_dict(sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any("window" in k or "running_g" in k or "psi" in k for k in sd)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(stock.eval()(x), model(x)) < 1e-10
    # conv weights are centralized (eq. 18)
    assert sd["conv1.weight"].mean(dim=(1, 2, 3)).abs().max() < 1e-12


def test_plain_model_keeps_structure_and_outputs():
    torch.manual_seed(0)
    model = _train(_ConvNormNet(NORMS["vanilla-ema-sma"], True).double())
    plain = plain_model(model)
    assert type(plain.bn1) is nn.BatchNorm2d and type(plain.conv1) is nn.Conv2d
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(plain(x), model(x)) < 1e-12


def test_fold_refuses_training_mode():
    model = _mabn_resnet("resnet18")
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        fold_model(model)
    model.eval()
    model.layer1[0].bn1.train()  # one stray training-mode layer is refused too
    with pytest.raises(ValueError, match="layer1.0.bn1"):
        fold_model(model)


class _PreNorm(nn.Module):
    """A norm on the input (no conv before it) and one whose conv output is reused."""

    def __init__(self):
        super().__init__()
        self.bn0 = MABN2d(3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(self.bn0(x))
        return self.bn1(y) + y


def test_unfoldable_norms():
    model = _randomise_stats(_PreNorm().double()).eval()
    with pytest.raises(ValueError, match=r"bn0: its input is not produced by[\s\S]*bn1: the output"):
        fold_model(model)
    kept = fold_model(model, strict=False)
    assert type(kept.bn0) is nn.BatchNorm2d and type(kept.bn1) is nn.BatchNorm2d
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(kept(x), model(x)) < 1e-12


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream
def test_export_torchscript(tmp_path):
    torch.manual_seed(0)
    model = _train(_ConvNormNet(NORMS["MABN2d"], True))
    export_torchscript(model, tmp_path / "m.pt")
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert _rel_err(loaded(x), model(x)) < 1e-5


def test_export_onnx_runs_in_onnxruntime(tmp_path):
    """onnx and onnxruntime come with the test extra: the exported folded model, run by
    onnxruntime, gives the PyTorch model's outputs, also at another batch size (dynamic batch)."""
    import onnx
    import onnxruntime

    torch.manual_seed(0)
    model = _train(_ConvNormNet(NORMS["MABN2d"], True))
    export_onnx(model, tmp_path / "m.onnx", example_input=torch.randn(2, 3, 8, 8))
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops  # folded
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (2, 5):
        x = torch.randn(n, 3, 8, 8)
        (got,) = session.run(["output"], {"input": x.numpy()})
        with torch.no_grad():
            assert _rel_err(torch.from_numpy(got), model(x)) < 1e-5


def test_export_onnx_without_onnx_says_so(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find_spec(name, *a))
    model = _ConvNormNet(NORMS["MABN2d"], True).eval()
    with pytest.raises(ImportError, match="needs the optional 'onnx' package"):
        export_onnx(model, tmp_path / "m.onnx", example_input=torch.randn(2, 3, 8, 8))


def test_input_dependent_norms_are_left_alone():
    """GroupNorm (and LayerNorm/InstanceNorm) normalize with statistics of the input at inference:
    not a linear map, so fold_model leaves them and only turns CenConv2d into plain convolutions."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(32, c))
    model = convert_model(model, norm=None, weight_centralization=True).double().eval()
    folded = fold_model(model)
    assert sum(isinstance(m, nn.GroupNorm) for m in folded.modules()) == 20
    assert not _has_mabn_layers(folded)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(folded(x), model(x)) < 1e-10
