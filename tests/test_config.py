"""Config composition and validation: presets, paper defaults, invalid values."""

import glob
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import mabn
from mabn.engine import config, models, trainer

from _train_utils import CONFIGS, PYTHON, compose_cfg, load_cfg, run_script

# The rows of Table 2 and Table 4 (appendix B.2), written out from the paper:
# (form, fp_stats, bp_stats, weight centralization, normalization batch, alpha, buffer or None).
V, M = "vanilla", "modified"
ROWS = {
    "table2_row1_bn_regular": (V, "batch", "batch", False, 32, 0.9, None),
    "table2_row2_modified_regular": (M, "batch", "batch", True, 32, 0.9, None),
    "table2_row3_bn_small": (V, "batch", "batch", False, 2, 0.9, None),
    "table2_row4_brn": (V, "ema", "batch", False, 2, 0.9, None),
    "table2_row5_brn_sma": (V, "ema", "sma", False, 2, 0.98, 16),
    "table2_row6_modified_small": (M, "batch", "batch", True, 2, 0.9, None),
    "table2_row7_modified_ema": (M, "ema", "batch", True, 2, 0.9, None),
    "table2_row8_mabn": (M, "ema", "sma", True, 2, 0.98, 16),
    "table4_row1_mabn": (M, "ema", "sma", True, 2, 0.98, 16),
    "table4_row2_wc_sma_sma": (M, "sma", "sma", True, 2, 0.98, 16),
    "table4_row3_wc_ema_ema": (M, "ema", "ema", True, 2, 0.9, None),
    "table4_row4_wc_ema_bs": (M, "ema", "batch", True, 2, 0.9, None),
    "table4_row5_wc_bs_bs": (M, "batch", "batch", True, 2, 0.9, None),
    "table4_row6_ema_sma": (M, "ema", "sma", False, 2, 0.98, 16),
    "table4_row7_ema_bs": (M, "ema", "batch", False, 2, 0.9, None),
    "table4_row8_bs_bs": (M, "batch", "batch", False, 2, 0.9, None),
    "table4_row9_bn_small": (V, "batch", "batch", False, 2, 0.9, None),
    "table4_row10_wc_bn_small": (V, "batch", "batch", True, 2, 0.9, None),
    "table4_row11_modified_regular": (M, "batch", "batch", False, 32, 0.9, None),
}


def test_one_preset_per_table_row():
    names = sorted(os.path.basename(f)[:-5] for f in glob.glob(os.path.join(CONFIGS, "experiment", "*.yaml")))
    assert names == sorted(ROWS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_experiment_preset_builds_the_rows_layers(name):
    form, fp, bp, wc, nbs, alpha, buffer = ROWS[name]
    # The paper's setting, with synthetic data standing in for the ImageNet folders.
    cfg = load_cfg([f"experiment={name}", "data=synthetic", "data.batch_size=32"])
    assert cfg.name == name and cfg.model.arch == "resnet50" and not cfg.model.small_input
    assert cfg.schedule.iterations == 600_000
    model = models.build_model(cfg.model, cfg.norm, 1000)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, mabn.BatchStatNorm2d))]
    assert len(norms) == 53  # every normalization of ResNet-50 was converted
    for m in norms:
        assert type(m) is mabn.BatchStatNorm2d
        assert (m.form, m.fp_stats, m.bp_stats, m.norm_batch_size) == (form, fp, bp, nbs)
        assert m.alpha == pytest.approx(alpha)
        if buffer is not None:
            assert m.buffer_size == buffer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53  # stem, 3 x 16 bottleneck convs, 4 shortcut projections
    assert all(isinstance(c, mabn.CenConv2d) == wc for c in convs)


def test_experiment_preset_needs_imagenet_root():
    with pytest.raises(config.ConfigError, match="data.root is required"):
        load_cfg(["experiment=table2_row8_mabn"])


def test_paper_defaults():
    cfg = load_cfg(["experiment=table2_row8_mabn", "data=synthetic", "data.batch_size=32"])
    assert trainer.base_lr(cfg, world_size=8) == pytest.approx(0.1)  # 0.1 x 256 / 256
    assert trainer.lr_at(cfg, 150_000, 0.1) == pytest.approx(0.1)
    assert trainer.lr_at(cfg, 150_001, 0.1) == pytest.approx(0.01)
    assert trainer.lr_at(cfg, 450_001, 0.1) == pytest.approx(1e-4)
    o = cfg.optim
    assert (o.momentum, o.weight_decay, o.nesterov, o.decay_norm_and_bias) == (0.9, 1e-4, False, True)
    model = models.build_model(cfg.model, cfg.norm, 1000)
    sgd = trainer.build_optimizer(model, cfg, 0.1)
    assert len(sgd.param_groups) == 1 and sgd.param_groups[0]["weight_decay"] == 1e-4  # gamma, beta too
    conv = model.layer1[0].conv2
    std = conv.weight.std().item()  # He fan_out: std = sqrt(2 / (out * k * k))
    assert std == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)
    bn = model.layer1[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_quickstart_defaults():
    cfg = load_cfg()
    assert (cfg.data.name, cfg.model.arch, cfg.model.small_input, cfg.norm.form, cfg.norm.bp_stats) == \
        ("synthetic", "resnet18", True, "modified", "sma")
    assert cfg.norm.norm_batch_size == 2 and cfg.data.batch_size == 32 and cfg.out_dir == "runs/quickstart"


@pytest.mark.parametrize("preset,cls", [("bn", mabn.BatchStatNorm2d), ("bn_small", mabn.BatchStatNorm2d),
                                        ("brn", mabn.BatchStatNorm2d), ("modified", mabn.BatchStatNorm2d),
                                        ("mabn", mabn.BatchStatNorm2d), ("gn", nn.GroupNorm),
                                        ("torch_bn", nn.BatchNorm2d), ("syncbn", mabn.SyncBatchNorm2d)])
def test_norm_presets(preset, cls):
    cfg = load_cfg([f"norm={preset}"])
    model = models.build_model(cfg.model, cfg.norm, 10)
    assert type(model.layer1[0].bn1) is cls


def test_ablation_by_override():
    cfg = load_cfg(["norm=mabn", "norm.fp_stats=sma", "norm.weight_centralization=false", "norm.buffer_size=8",
                    "norm.norm_batch_size=4", "norm.alpha=0.95"])
    m = models.build_model(cfg.model, cfg.norm, 10)
    bn = m.layer2[0].bn2
    assert (bn.fp_stats, bn.bp_stats, bn.buffer_size, bn.norm_batch_size, bn.alpha) == ("sma", "sma", 8, 4, 0.95)
    assert type(m.conv1) is nn.Conv2d


@pytest.mark.parametrize("overrides,message", [
    (["data.batch_size=30", "norm.norm_batch_size=4"], "data.batch_size=30 is not divisible by norm.norm_batch_size=4"),
    (["optim.lr=-0.1"], "optim.lr=-0.1 must be > 0"),
    (["norm.alpha=1.5"], "norm.alpha=1.5 must be in [0, 1)"),
    (["norm.momentum=0.1"], "norm.momentum"),  # renamed norm.alpha: an unknown key
    (["norm.fp_stats=median"], "norm.fp_stats='median' is not one of"),
    (["data=imagefolder"], "data.root is required for data.name=imagefolder"),
    (["data=imagefolder", "data.root=/nonexistent/x"], "data.root=/nonexistent/x: data.train_dir folder"),
    (["schedule.milestones=[10,5]"], "schedule.milestones=[10, 5] must be increasing"),
    (["norm=torch_bn", "norm.norm_batch_size=2"], "norm.norm_batch_size=2 needs norm.layer=batchstat"),
    (["norm.bogus=1"], "bogus"),
    (["data.batch_size=abc"], "data.batch_size"),
])
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(Exception) as e:
        load_cfg(overrides)
    assert message in str(e.value)


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    out = tmp_path / "run"
    r = run_script([PYTHON, "train_imagenet.py", "data.batch_size=30", "norm.norm_batch_size=4", f"out_dir={out}"])
    assert r.returncode != 0
    assert "data.batch_size=30 is not divisible by norm.norm_batch_size=4" in r.stderr
    assert not out.exists()
    r = run_script([PYTHON, "train_imagenet.py", "norm=nosuchpreset", f"out_dir={out}"])
    assert r.returncode != 0 and "nosuchpreset" in r.stderr and not out.exists()


def test_syncbn_trains_on_the_cpu_in_one_process_as_bn_over_the_whole_batch(tmp_path):
    """norm=syncbn is mabn.SyncBatchNorm2d (nn.SyncBatchNorm that also runs on the CPU, over gloo
    when distributed): the machine check accepts it on the CPU, and one process normalizes its
    whole batch, as norm=torch_bn does (the same run, the same weights)."""
    from _train_utils import tiny, train_in_process
    config.check_machine(load_cfg(["norm=syncbn", "device=cpu"]))
    ckpt = {}
    for preset in ("syncbn", "torch_bn"):
        out = tmp_path / preset
        m = train_in_process(tiny(out, iterations=3, norm=preset, **{"norm.norm_batch_size": "null"}))
        assert m["status"] == "finished"
        ckpt[preset] = torch.load(out / "checkpoints" / "ckpt_0000003.pt", weights_only=False)["model"]
    assert ckpt["syncbn"].keys() == ckpt["torch_bn"].keys()
    for k, v in ckpt["torch_bn"].items():
        assert torch.allclose(ckpt["syncbn"][k].float(), v.float(), rtol=1e-4, atol=1e-5), k


def test_the_family_layer_is_named_batchstat_and_the_old_name_still_loads():
    cfg = load_cfg(["norm=bn"])
    assert cfg.norm.layer == "batchstat" and config.norm_options(cfg.norm)["layer"] == "batchstat"
    assert load_cfg(["norm.layer=mabn"]).norm.layer == "batchstat"
    saved = config.upgrade_saved_config({"norm": {"layer": "mabn", "momentum": 0.9}})
    assert saved.norm.layer == "batchstat" and saved.norm.alpha == 0.9 and "momentum" not in saved.norm


def test_config_and_models_import_no_circle():
    """mabn.engine.config reads the architectures and layers from mabn.engine.registry and never
    imports the model builders (which import config); no engine module imports inside a function
    to dodge a circle."""
    code = ("import sys, mabn.engine.config; "
            "assert 'mabn.engine.models' not in sys.modules, 'config imports models'")
    r = run_script([PYTHON, "-c", code])
    assert r.returncode == 0, r.stderr[-3000:]
    import ast
    engine = os.path.join(os.path.dirname(config.__file__))
    for name in ("config.py", "models.py", "registry.py", "trainer.py", "run.py", "checkpoint.py", "files.py"):
        tree = ast.parse(open(os.path.join(engine, name)).read())
        local = [n.lineno for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
                 if (isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("mabn")))
                 or (isinstance(n, ast.Import) and any(a.name.startswith("mabn") for a in n.names))]
        assert not local, f"{name}: imports inside functions at lines {local}"


def test_resume_free_keys_are_real_keys_with_reasons():
    keys = {k for k, _ in config._flat(OmegaConf.to_container(OmegaConf.structured(config.Config)))}
    for key, reason in config.RESUME_FREE_KEYS:
        assert reason and (key in keys or (key.endswith(".") and any(k.startswith(key) for k in keys))), key


def test_a_resume_ignores_the_norm_keys_its_layer_does_not_read():
    """norm.num_groups does not change a batch-statistics layer (nor norm.buffer_size a GroupNorm):
    a checkpoint's config that differs only there fits; one that differs in a key the layer reads
    does not."""
    from omegaconf import OmegaConf
    cfg = load_cfg(["norm=mabn"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["norm"]["num_groups"] = 8
    assert config.check_checkpoint_fits(saved, cfg, 1, "ckpt") == []
    saved["norm"]["buffer_size"] = 3
    with pytest.raises(config.ConfigError, match=r"norm.buffer_size=16 \(the checkpoint's: 3\)"):
        config.check_checkpoint_fits(saved, cfg, 1, "ckpt")
    gn = load_cfg(["norm=gn"])
    saved = OmegaConf.to_container(gn, resolve=True)
    saved["norm"]["buffer_size"] = 3
    assert config.check_checkpoint_fits(saved, gn, 1, "ckpt") == []
    assert config.unused_norm_keys(gn) >= {"norm.buffer_size", "norm.alpha", "norm.r_max"}
