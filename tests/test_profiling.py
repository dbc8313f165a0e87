"""Where a step's time goes (mabn.lab.profiling, scripts/profile_run.py): every event's own time is
charged to exactly one part, the right one."""

import importlib.util
import os

import pytest
import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import mabn
from mabn.lab import profiling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, part", [
    ("part::convolution", "convolution"),
    ("autograd::engine::evaluate_function: ConvolutionBackward0", "convolution"),
    ("_Centralize", "weight centralization"), ("_CentralizeBackward", "weight centralization"),
    ("autograd::engine::evaluate_function: NormalizeBackward", "normalization"),
    ("_TrainStepBackward", "normalization"), ("NativeBatchNormBackward0", "normalization"),
    ("autograd::engine::evaluate_function: ThresholdBackward0", "activation, pooling, linear"),
    ("Optimizer.step#SGD.step", "optimizer"), ("aten::mul", None), ("aten::convolution", None)])
def test_part_of_event_names(name, part):
    assert profiling.part_of(name) == part


def test_attribute_conserves_time_and_charges_the_layers():
    torch.manual_seed(0)
    model = nn.Sequential(mabn.CenConv2d(3, 8, 3, padding=1, bias=False), mabn.MABN2d(8, norm_batch_size=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with profile(activities=[ProfilerActivity.CPU]) as prof, profiling.label_layers():
        for _ in range(3):
            with record_function("trainer::data"):
                xb = x * 1.0
            loss = nn.functional.cross_entropy(model(xb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with record_function("trainer::validation"), torch.no_grad():
            model.eval()(x)
    events = prof.events()
    parts = profiling.attribute(events)
    total = sum(ev.self_cpu_time_total for ev in events) / 1e6
    assert sum(parts.values()) == pytest.approx(total, rel=1e-9)  # every event charged once
    for part in ("convolution", "weight centralization", "normalization", "activation, pooling, linear",
                 "optimizer", "validation", "data (the batch)"):
        assert parts.get(part, 0) > 0, (part, parts)
    # the validation forward's convolution is charged to the validation, not to the convolutions
    starts = profiling.iteration_starts(events)
    assert len(starts) == 3
    later = profiling.attribute(events, starts[1])
    assert later["convolution"] < parts["convolution"] and later["validation"] == parts["validation"]
    # the hooks are gone after the block
    assert not nn.modules.module._global_forward_pre_hooks


def test_profile_run_script_on_the_synthetic_default(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("profile_run", os.path.join(REPO, "scripts", "profile_run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.md"
    assert mod.main(["--iters", "3", "--skip", "1", "data.batch_size=4", "norm.norm_batch_size=2",
                     "model=resnet8", "data.image_size=16", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| convolution |" in text and "| normalization |" in text and "| data (the batch) |" in text
    assert mod.main(["--iters", "3", "--skip", "1", "data.batch_size=3", "norm.norm_batch_size=2"]) == 2
    assert "invalid configuration" in capsys.readouterr().err
    assert mod.main(["--iters", "2", "--cpu-capability", "avx2"]) == 2  # torch already imported here


def test_iteration_clock_counts_training_forwards_of_the_root_only():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with profiling.iteration_clock() as cpu_times:
        for _ in range(4):
            model.train()(torch.randn(2, 3))
        model.eval()(torch.randn(2, 3))
    assert len(cpu_times) == 4 and cpu_times == sorted(cpu_times)
    assert not nn.modules.module._global_forward_pre_hooks
