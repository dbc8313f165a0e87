"""eval.py reproduces the validation error that training logged, on a real ImageFolder, and takes
the same Hydra overrides as train_imagenet.py."""

import json
import os

from _train_utils import PYTHON, make_image_folder, metrics, run_script, tiny, train_in_process


def test_eval_reproduces_training_error(tmp_path, caplog):
    root = make_image_folder(tmp_path / "images")
    with open(os.path.join(root, "train", "class0", "broken.png"), "wb") as f:
        f.write(b"this is not a PNG")  # logged and replaced by the next image, not a crash
    out = tmp_path / "run"
    overrides = tiny(out, iterations=6, **{"data": "imagefolder", "data.root": root, "data.image_size": 16,
                                          "data.batch_size": 4, "data.eval_batch_size": 5})
    m = train_in_process(overrides)
    assert m["status"] == "finished" and m["val_top1_err"] is not None
    assert "unreadable image" in caplog.text and "broken.png" in caplog.text

    ckpt = out / "checkpoints" / "ckpt_0000006.pt"
    # A run directory resolves to its newest checkpoint; a different eval batch changes nothing.
    r = run_script([PYTHON, "eval.py", f"ckpt={out}", "data.eval_batch_size=3", "device=cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "checkpoints" / "ckpt_0000006.eval.json") as f:
        result = json.load(f)
    assert result["checkpoint"] == str(ckpt.resolve()) and result["samples"] == 12
    assert result["top1_err"] == metrics(out)["val_top1_err"]
    assert result["top5_err"] == metrics(out)["val_top5_err"]
    assert json.loads(r.stdout)["top1_err"] == result["top1_err"]


def test_eval_rejects_a_corrupted_checkpoint(tmp_path):
    bad = tmp_path / "ckpt_0000001.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run_script([PYTHON, "eval.py", f"ckpt={bad}"])
    assert r.returncode == 2 and "is corrupted or not a checkpoint" in r.stderr


def test_eval_under_torchrun_matches_single_process(tmp_path):
    out = tmp_path / "run"
    m = train_in_process(tiny(out, iterations=2, **{"data.val_size": 25}))  # 25: uneven shards
    r = run_script([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "eval.py", f"ckpt={out / 'checkpoints' / 'ckpt_0000002.pt'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "checkpoints" / "ckpt_0000002.eval.json") as f:
        result = json.load(f)
    assert result["world_size"] == 2 and result["samples"] == 25
    assert result["top1_err"] == m["val_top1_err"]


def test_eval_folded_and_torchvision_forms_match_the_trained_model(tmp_path):
    import torch
    from omegaconf import OmegaConf

    from mabn.engine import config, models
    from mabn.engine.evaluation import evaluate_checkpoint, inference_model, resolve_checkpoint

    out = tmp_path / "run"
    m = train_in_process(tiny(out, iterations=4))  # the quickstart's MABN with weight centralization
    assert m["status"] == "finished"
    results = {form: evaluate_checkpoint(str(out), [], "cpu", form) for form in ("trained", "folded", "torchvision")}
    for form in ("folded", "torchvision"):
        assert results[form]["top1_err"] == results["trained"]["top1_err"] == m["val_top1_err"]
        assert results[form]["top5_err"] == results["trained"]["top5_err"]
        assert os.path.exists(out / "checkpoints" / f"ckpt_0000004.eval-{form}.json")
    # The logits themselves agree.
    state, _ = resolve_checkpoint(str(out))
    cfg = config.load(OmegaConf.create(state["config"]))
    nc = cfg.model.num_classes or cfg.data.num_classes
    x = torch.randn(3, 3, cfg.data.image_size, cfg.data.image_size)
    logits = {}
    for form in ("trained", "folded", "torchvision"):
        model = models.build_model(cfg.model, cfg.norm, nc)
        model.load_state_dict(state["model"])
        with torch.no_grad():
            logits[form] = inference_model(model, form, cfg.model, nc)(x)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in inference_model(model, "folded", cfg.model, nc).modules())
    torch.testing.assert_close(logits["folded"], logits["trained"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["torchvision"], logits["trained"], rtol=1e-4, atol=1e-4)


def test_eval_takes_hydra_group_and_key_overrides(tmp_path):
    """data=imagefolder replaces the checkpoint's data section (trained on synthetic data) by the
    group's file, key=value overrides set single keys; form is a key too."""
    from mabn.engine.evaluation import evaluate_checkpoint

    root = make_image_folder(tmp_path / "images")  # 3 classes, 4 validation images each
    out = tmp_path / "run"
    train_in_process(tiny(out, iterations=2, **{"data.num_classes": 3}))
    r = run_script([PYTHON, "eval.py", f"ckpt={out}", "data=imagefolder", f"data.root={root}",
                    "data.image_size=16", "data.workers=0", "form=folded", "device=cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert (result["data"], result["samples"], result["form"]) == ("imagefolder", 12, "folded")
    assert result["val"] == os.path.join(root, "val")
    assert result["output"].endswith("ckpt_0000002.eval-folded.json")
    # The same evaluation by single keys, in process, as trained: the same error.
    ref = evaluate_checkpoint(str(out), ["data.name=imagefolder", f"data.root={root}", "data.image_size=16",
                                         "data.workers=0"], "cpu")
    assert (ref["top1_err"], ref["top5_err"]) == (result["top1_err"], result["top5_err"])
    # Only the named key changes: without data=imagefolder the synthetic data stays.
    r = run_script([PYTHON, "eval.py", f"ckpt={out}", f"data.root={root}", "device=cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["data"] == "synthetic"


def test_eval_command_line_errors(tmp_path):
    r = run_script([PYTHON, "eval.py", "data.root=/x"])
    assert r.returncode == 2 and "ckpt is required" in r.stderr
    r = run_script([PYTHON, "eval.py", f"ckpt={tmp_path}", "experiment=table2_row8_mabn"])
    assert r.returncode == 1 and "experiment" in r.stderr  # Hydra: not a group of eval.py
    r = run_script([PYTHON, "eval.py", f"ckpt={tmp_path}", "+seed2=1"])
    assert r.returncode == 2 and "eval.py takes group=option and key=value overrides" in r.stderr
    r = run_script([PYTHON, "eval.py", f"ckpt={tmp_path}", "form=fused"])
    assert r.returncode == 2 and "no usable checkpoint" in r.stderr


def test_eval_refuses_a_checkpoint_of_another_model_in_one_line(tmp_path):
    """model=resnet20 on a resnet8 checkpoint: exit 2 and the one line training gives for the same
    mismatch (naming model.arch), not a state_dict traceback."""
    out = tmp_path / "r8"
    train_in_process(tiny(out, iterations=1, model="resnet8"))
    r = run_script([PYTHON, "eval.py", f"ckpt={out}", "model=resnet20", "device=cpu"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ckpt: the checkpoint ") and "does not fit this config" in line
    assert "model.arch='resnet20' (the checkpoint's: 'resnet8')" in line
    t = run_script([PYTHON, "train_imagenet.py", *tiny(out, iterations=2, model="resnet20", resume="auto")])
    assert t.returncode == 2 and "model.arch='resnet20' (the checkpoint's: 'resnet8')" in t.stderr, t.stderr[-3000:]
    # A state dict that does not fit (the same config, other weights) says so in one line too.
    import torch
    from mabn.engine import checkpoint
    path = checkpoint.list_checkpoints(str(out / "checkpoints"))[0]
    state = checkpoint.load(path)
    state["model"].pop("fc.weight")
    bad = tmp_path / "bad" / "ckpt_0000001.pt"
    bad.parent.mkdir()
    torch.save(state, bad)
    r = run_script([PYTHON, "eval.py", f"ckpt={bad}", "device=cpu"])
    assert r.returncode == 2 and "does not fit the model of this config" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
