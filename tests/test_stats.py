"""The statistics recorder against explicit formulas on a known batch and upstream gradient."""

import csv
import math

import pytest
import torch
from torch import nn

import mabn
from mabn.stats import StatisticsRecorder

D = torch.float64


def explicit(x, dz, w, form, eps=1e-5):
    """Per-channel statistics by explicit loops over channels (independent of mabn.stats)."""
    C = x.shape[1]
    res = {k: torch.zeros(C, dtype=D) for k in ("mu", "sigma2", "chi2", "g", "psi")}
    for ch in range(C):
        xc, dc = x[:, ch].reshape(-1), dz[:, ch].reshape(-1) * w[ch]
        n = xc.numel()
        mu = xc.sum() / n
        var = ((xc - mu) ** 2).sum() / n
        chi2 = (xc ** 2).sum() / n
        res["mu"][ch], res["sigma2"][ch], res["chi2"][ch] = mu, var, chi2
        y = (xc - mu) / math.sqrt(var + eps) if form == "vanilla" else xc / math.sqrt(chi2 + eps)
        res["g"][ch] = dc.sum() / n
        res["psi"][ch] = (dc * y).sum() / n
    keys = ("mu", "sigma2", "g", "psi") if form == "vanilla" else ("chi2", "psi")
    return {k: math.sqrt(float((res[k] ** 2).sum())) for k in keys}


@pytest.mark.parametrize("preset,form", [("BatchNorm2d", "vanilla"), ("MABN2d", "modified")])
def test_recorded_values_equal_direct_computation(tmp_path, preset, form):
    torch.manual_seed(0)
    layer = getattr(mabn, preset)(3, norm_batch_size=2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    model = nn.Sequential()
    model.add_module("bn", layer)
    rec = StatisticsRecorder(model, layers=["bn"], every=1, csv_path=str(tmp_path / "s.csv"))
    x = torch.randn(8, 3, 4, 4, dtype=D) * 2 + 1
    U = torch.randn(8, 3, 4, 4, dtype=D)
    assert rec.start(1)
    (model(x) * U).sum().backward()  # dL/dZ = U
    rows = {r["statistic"]: r for r in rec.finish()}
    small, regular = explicit(x[:2], U[:2], layer.weight.detach(), form), explicit(x, U, layer.weight.detach(), form)
    assert set(rows) == set(regular)
    for stat in regular:
        assert rows[stat]["small"] == pytest.approx(small[stat], rel=1e-9)
        assert rows[stat]["regular"] == pytest.approx(regular[stat], rel=1e-9)
    # Iteration 1: the used statistic of the first group is its own batch statistic (window of 1,
    # r = 1 during the renorm warm-up), forward and backward.
    for stat in regular:
        assert rows[stat]["used"] == pytest.approx(small[stat], rel=1e-9)
    with open(tmp_path / "s.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(regular) and float(lines[0]["small"]) == pytest.approx(rows[lines[0]["statistic"]]["small"])


def test_used_statistic_is_the_sma_for_mabn():
    torch.manual_seed(1)
    layer = mabn.MABN2d(2, norm_batch_size=2, buffer_size=16).double()
    model = nn.Sequential()
    model.add_module("bn", layer)
    rec = StatisticsRecorder(model, layers=["bn"], every=2)
    xs = [torch.randn(6, 2, 3, 3, dtype=D) * (1 + i) for i in range(2)]
    for it, x in enumerate(xs, start=1):
        rec.start(it)
        model(x).sum().backward()
        rows = {r["statistic"]: r for r in rec.finish()}
    # Iteration 2: the window holds the 3 groups of iteration 1 and group 0 of iteration 2.
    groups = [xs[0][2 * k:2 * k + 2] for k in range(3)] + [xs[1][:2]]
    sma = torch.stack([(g ** 2).mean(dim=(0, 2, 3)) for g in groups]).mean(0)
    assert rows["chi2"]["used"] == pytest.approx(float(sma.norm()), rel=1e-9)
    assert rows["chi2"]["used"] != pytest.approx(rows["chi2"]["small"], rel=1e-3)


def test_inplace_relu_after_the_layer_sees_the_right_gradient():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, 5, dtype=D)
    U = torch.randn(4, 3, 5, 5, dtype=D)
    results = []
    for inplace in (False, True):
        layer = mabn.BatchNorm2d(3, norm_batch_size=2).double()
        model = nn.Sequential()
        model.add_module("bn", layer)
        model.add_module("relu", nn.ReLU(inplace=inplace))
        rec = StatisticsRecorder(model, layers=["bn"], every=1)
        rec.start(1)
        (model(x) * U).sum().backward()
        rows = rec.finish()
        results.append({f"{r['statistic']}/{kind}": r[kind] for r in rows for kind in ("small", "regular")})
    assert results[0] == pytest.approx(results[1], rel=1e-12)


def test_off_switch_and_non_recording_iterations_leave_no_hooks():
    torchvision = pytest.importorskip("torchvision")
    model = mabn.convert_model(torchvision.models.resnet18(num_classes=4),  # vanilla: mean, var, g, psi
                               dict(form="vanilla", fp_stats="batch", bp_stats="batch", norm_batch_size=2))

    def hooks():
        return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
                   for m in model.modules())

    assert hooks() == 0
    rec = StatisticsRecorder(model, every=10)
    assert hooks() == 0  # constructing attaches nothing
    assert not rec.start(3) and hooks() == 0  # not a recording iteration
    assert rec.start(10) and hooks() == 1
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert len(rec.finish()) == 4 and hooks() == 0
    assert not model.layer1[0].bn1.record_used_statistics


def test_unknown_layer_name_is_a_clear_error():
    model = nn.Sequential(mabn.MABN2d(3))
    with pytest.raises(ValueError, match="layer 'layer1.0.bn1' is not a module"):
        StatisticsRecorder(model)


def test_plot_script_renders_figures_from_the_csv(tmp_path):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "plot_statistics", os.path.join(os.path.dirname(__file__), "..", "scripts", "plot_statistics.py"))
    plot_statistics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_statistics)
    csv_path = str(tmp_path / "statistics.csv")
    model = nn.Sequential()
    model.add_module("bn", mabn.MABN2d(3, norm_batch_size=2))
    rec = StatisticsRecorder(model, layers=["bn"], every=1, csv_path=csv_path)
    for it in range(1, 4):
        rec.start(it)
        model(torch.randn(4, 3, 4, 4)).pow(2).sum().backward()
        rec.finish()
    for fig in ("3", "4"):
        out = tmp_path / f"figure{fig}.png"
        plot_statistics.main([str(tmp_path), "--figure", fig, "--layer", "bn", "--out", str(out)])
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match=r"figure 2 needs statistics \['mu', 'sigma2', 'g'\]"):
        plot_statistics.main([csv_path, "--figure", "2", "--layer", "bn", "--out", str(tmp_path / "f2.png")])


def test_trainer_records_statistics_when_enabled(tmp_path):
    from _train_utils import tiny, train_in_process

    from mabn.engine.config import ConfigError

    out = tmp_path / "run"
    m = train_in_process(tiny(out, iterations=4, **{"stats.enabled": "true", "stats.every": 2}))
    assert m["status"] == "finished"
    with open(out / "statistics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["iteration"], r["statistic"]) for r in rows] == [("2", "chi2"), ("2", "psi"), ("4", "chi2"), ("4", "psi")]
    assert all(r["layer"] == "layer1.0.bn1" and float(r["used"]) > 0 for r in rows)
    with pytest.raises(ConfigError, match="stats.layers: layer 'layer9.bn' is not a module"):
        train_in_process(tiny(tmp_path / "bad", **{"stats.enabled": "true", "stats.layers": "[layer9.bn]"}))
    # Off (the default): no CSV.
    train_in_process(tiny(tmp_path / "off", iterations=2))
    assert not (tmp_path / "off" / "statistics.csv").exists()


def test_deviation_figure_of_several_runs(tmp_path, capsys):
    """--figure deviation: the relative error of the used statistic against explicit values, the
    running median, and the figure and per-third summary of two runs."""
    import importlib.util
    import json
    import os

    spec = importlib.util.spec_from_file_location(
        "plot_statistics", os.path.join(os.path.dirname(__file__), "..", "scripts", "plot_statistics.py"))
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    runs = []
    for name, scale in (("a", 0.1), ("b", 0.5)):
        run = tmp_path / name
        run.mkdir()
        with open(run / "statistics.csv", "w") as f:
            f.write("iteration,layer,statistic,small,regular,used\n")
            for it in range(1, 31):
                for stat in ("g", "psi"):
                    f.write(f"{it},bn,{stat},1.0,2.0,{2.0 * (1 + scale * (it % 3 - 1))}\n")
        (run / "train_log.jsonl").write_text("".join(json.dumps({"iteration": i, "loss": 1.0 / i}) + "\n" for i in (10, 20, 30)))
        runs.append(f"{name}={run}")
    series = ps.load(str(tmp_path / "b"))
    dev = ps.relative_deviation(series, "bn", "psi")
    assert [i for i, _ in dev] == list(range(1, 31))
    assert all(abs(v - 0.5 * abs(i % 3 - 1)) < 1e-12 for i, v in dev)  # |used - 2| / 2
    assert ps.running_median([(1, 5.0), (2, 1.0), (3, 3.0)], width=3) == [(1, 5.0), (2, 3.0), (3, 3.0)]
    out = tmp_path / "dev.png"
    ps.main(["--figure", "deviation", *runs, "--layer", "bn", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "a: psi 10% / 10% / 10%" in text and "b: g 50% / 50% / 50%" in text, text
    with pytest.raises(SystemExit, match="figure 4 takes one input; got 2"):
        ps.main([str(tmp_path / "a"), str(tmp_path / "b"), "--figure", "4", "--layer", "bn", "--out", str(out)])
