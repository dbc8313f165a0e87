"""The detection trainer (scripts/train_detection.py, mabn.detection): detectors built with every
norm of the group, training lowers the loss, metrics.json holds the COCO numbers, resume is
exact, a 2-rank gloo run with SyncBN, and every bad input stops with one line (exit 2)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from _train_utils import CONFIGS, PYTHON, REPO, run_script

import mabn
from mabn.detection import config as det_config
from mabn.detection.models import build_detector, norm_layers

SCRIPT = os.path.join(REPO, "scripts", "train_detection.py")


def _source(root) -> str:
    """A tiny ImageFolder of patterned 64 px JPEG "photographs" (3 classes), as the builder reads."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c in range(3):
            folder = os.path.join(root, split, f"n0{c}")
            os.makedirs(folder)
            for i in range(n):
                base = rng.integers(0, 255, 3)
                img = (base + rng.integers(-40, 40, (64, 64, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f"{i}.JPEG"))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(f"n0{c}\tclass {c}\n" for c in range(3)))
    return str(root)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from mabn.detection.synthetic import build_detection_dataset
    base = tmp_path_factory.mktemp("det")
    out = base / "data"
    build_detection_dataset(str(out), seed=0, source=_source(base / "src"), train_images=24, val_images=8,
                            image_size=64, max_objects=3, min_object_size=16, max_object_size=40)
    return str(out)


def small(data_root, out_dir=None, iterations=4, **extra) -> list[str]:
    """Overrides for a detection run of seconds: the small Mask R-CNN at 64 px, steps of 4 images
    in groups of 2, CPU."""
    o = {"data.root": data_root, "device": "cpu", "data.batch_size": 4, "data.eval_batch_size": 4,
         "model.min_size": 64, "model.max_size": 64, "model.backbone_width": 8, "model.fpn_channels": 32,
         "model.fc_dim": 64, "schedule.iterations": iterations, "schedule.milestones": "[]",
         "schedule.warmup_iters": 0, "schedule.log_every": 1, "schedule.eval_every": 0,
         "schedule.ckpt_every": 100, "norm.buffer_size": 4, "progress_bar": "false", "optim.lr": 0.01}
    if out_dir is not None:
        o["out_dir"] = str(out_dir)
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def compose_det(overrides):
    from hydra.core.config_store import ConfigStore
    ConfigStore.instance().store(name="detection_schema", node=det_config.DetectionConfig)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="detection", overrides=list(overrides))


def load_det(overrides):
    return det_config.load(compose_det(overrides))


def train_det(overrides) -> dict:
    from mabn.detection.task import DetectionTask
    from mabn.engine import trainer
    return trainer.train(load_det(overrides), DetectionTask())


# ------------------------------------------------------------------------------------------------
# Models

EXPECTED = {"bn": mabn.BatchStatNorm2d, "bn_small": mabn.BatchStatNorm2d, "brn": mabn.BatchStatNorm2d,
            "modified": mabn.BatchStatNorm2d, "mabn": mabn.BatchStatNorm2d, "gn": nn.GroupNorm,
            "torch_bn": nn.BatchNorm2d, "syncbn": mabn.SyncBatchNorm2d}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
@pytest.mark.parametrize("heads", [False, True])
def test_every_norm_builds_a_detector_holding_only_that_norm(data_root, preset, heads):
    extra = {"model.norm_in": "backbone_and_heads", "model.box_head": "4conv1fc",
             "model.head_warmup_iters": 7} if heads else {}
    if preset == "gn":
        extra.update({"norm.num_groups": 8})
    cfg = load_det(small(data_root, norm=preset, **extra))
    model = build_detector(cfg.model, cfg.norm, 4)
    layers = norm_layers(model)
    kinds = {type(m) for m in layers.values()}
    assert kinds == {EXPECTED[preset]}, (preset, kinds)  # no FrozenBatchNorm2d, no stray BatchNorm2d
    body = [n for n in layers if n.startswith("backbone.body.")]
    fpn = [n for n in layers if n.startswith("backbone.fpn.")]
    box = [n for n in layers if n.startswith("roi_heads.box_head.")]
    mask = [n for n in layers if n.startswith("roi_heads.mask_head.")]
    assert len(body) == 20 and len(fpn) == 8  # ResNet-18: stem + 16 in blocks + 3 shortcuts; 4 + 4 FPN convs
    assert (len(box), len(mask)) == ((4, 4) if heads else (0, 0))
    if preset in ("bn_small", "mabn", "brn", "modified"):
        assert all(layers[n].norm_batch_size == 2 for n in body + fpn)
        assert all(layers[n].norm_batch_size is None and layers[n].warmup_iters == 7 for n in box + mask)
    centralized = [n for n, m in model.named_modules() if isinstance(m, mabn.CenConv2d)]
    assert bool(centralized) == bool(cfg.norm.weight_centralization)
    from mabn.detection.roi_align import MultiScaleRoIAlign  # the poolers with the sparse CPU backward
    pools = (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool)
    assert all(type(p) is MultiScaleRoIAlign for p in pools)
    assert [(p.output_size, p.sampling_ratio) for p in pools] == [((7, 7), 2), ((14, 14), 2)]


def test_retinanet_head_takes_only_group_norm(data_root):
    cfg = load_det(small(data_root, norm="gn", **{"norm.num_groups": 8, "model.arch": "retinanet",
                                                   "model.norm_in": "backbone_and_heads"}))
    model = build_detector(cfg.model, cfg.norm, 4)
    assert sum(isinstance(m, nn.GroupNorm) for m in model.head.modules()) == 8
    with pytest.raises(det_config.ConfigError, match="needs norm.layer=gn"):
        load_det(small(data_root, norm="mabn", **{"model.arch": "retinanet", "model.norm_in": "backbone_and_heads"}))


def test_retinanet_group_norm_head_under_any_backbone_norm(data_root):
    """model.retinanet_head_norm=gn puts GroupNorm after each of the head towers' 4 + 4 convs with
    a MABN backbone; the default keeps torchvision's plain towers; a wrong value is named."""
    default = load_det(small(data_root, norm="mabn", **{"model.arch": "retinanet"}))
    plain = build_detector(default.model, default.norm, 4)
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.head.modules())
    cfg = load_det(small(data_root, norm="mabn", **{"norm.num_groups": 8, "model.arch": "retinanet",
                                                     "model.retinanet_head_norm": "gn"}))
    model = build_detector(cfg.model, cfg.norm, 4)
    groups = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == 8 and all(g.num_groups == 8 for g in groups)
    assert any(isinstance(m, mabn.BatchStatNorm2d) for m in model.backbone.modules())
    with pytest.raises(det_config.ConfigError, match="model.retinanet_head_norm"):
        load_det(small(data_root, norm="mabn", **{"model.arch": "retinanet", "model.retinanet_head_norm": "bn"}))


# ------------------------------------------------------------------------------------------------
# Training

def _log(out) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_lowers_the_loss_and_writes_the_coco_numbers(data_root, tmp_path):
    out = tmp_path / "run"
    m = train_det(small(data_root, out, iterations=24, **{"schedule.log_every": 6, "data.val_images": 4}))
    assert m["status"] == "finished"
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75"):
            assert m[f"{t}_{k}"] is not None and 0.0 <= m[f"{t}_{k}"] <= 100.0
    rows = _log(out)
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(rows[0])
    with open(out / "metrics.json") as f:
        assert json.load(f)["segm_AP50"] == m["segm_AP50"]


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_the_box_only_detectors_train_and_report_box_ap(data_root, tmp_path, arch):
    m = train_det(small(data_root, tmp_path / "run", iterations=2, **{"model.arch": arch, "data.val_images": 4}))
    assert m["status"] == "finished" and m["bbox_AP"] is not None and "segm_AP" not in m


def test_a_stopped_run_resumes_to_the_same_weights(data_root, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    extra = {"schedule.eval_every": 0, "data.val_images": 2}
    train_det(small(data_root, whole, iterations=6, **extra))
    first = train_det(small(data_root, parts, iterations=6, stop_after=3, **extra))
    assert first["status"] == "interrupted"
    train_det(small(data_root, parts, iterations=6, resume="auto", **extra))
    a = torch.load(whole / "checkpoints" / "ckpt_0000006.pt", weights_only=False)
    b = torch.load(parts / "checkpoints" / "ckpt_0000006.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "data_time_s")} for r in rows]  # noqa: E731
    assert strip(_log(whole)) == strip(_log(parts))


def test_two_rank_gloo_run_with_syncbn(data_root, tmp_path):
    out = tmp_path / "run"
    args = small(data_root, out, iterations=2, norm="syncbn", **{"data.batch_size": 2, "data.val_images": 4})
    r = run_script([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT] + args)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "metrics.json") as f:
        m = json.load(f)
    assert m["status"] == "finished" and m["bbox_AP"] is not None
    with open(out / "log.txt") as f:
        assert "world size 2" in f.read()


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written

def _refused(args, message, out):
    r = run_script([PYTHON, SCRIPT] + args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(out)


def test_bad_inputs_stop_with_one_line_naming_the_key_or_file(data_root, tmp_path):
    out = tmp_path / "run"
    _refused(small(data_root, out, **{"model.num_classes": 7}), "model.num_classes=7 disagrees with the data", out)
    _refused(small(data_root, out, **{"data.batch_size": 3}),
             "data.batch_size=3 is not divisible by norm.norm_batch_size=2", out)
    _refused(small(str(tmp_path / "nowhere"), out), "data.root=", out)
    bad = tmp_path / "bad"
    os.makedirs(bad / "annotations")
    os.symlink(os.path.join(data_root, "train"), bad / "train")
    os.symlink(os.path.join(data_root, "val"), bad / "val")
    (bad / "annotations" / "instances_train.json").write_text("{not json")
    with open(os.path.join(data_root, "annotations", "instances_val.json")) as f:
        val = json.load(f)
    (bad / "annotations" / "instances_val.json").write_text(json.dumps(val))
    _refused(small(str(bad), out), "instances_train.json", out)
    val["annotations"][0]["category_id"] = 999
    (bad / "annotations" / "instances_train.json").write_text(json.dumps(val))
    _refused(small(str(bad), out, **{"data.train_split": "train"}), "999", out)


def test_backbone_initialised_from_an_imagenet_checkpoint_of_the_same_norm(data_root, tmp_path):
    """Table 6: the body of a train_imagenet.py ResNet-18 (ImageNet stem) checkpoint loads into the
    detector's backbone; a checkpoint of another normalization is refused, naming the key."""
    from _train_utils import tiny, train_in_process
    out = tmp_path / "imagenet"
    train_in_process(tiny(out, iterations=2, model="resnet18", **{"model.small_input": "false"}))
    path = out / "checkpoints" / "ckpt_0000002.pt"
    saved = torch.load(path, weights_only=False)["model"]
    cfg = load_det(small(data_root, **{"model.backbone_checkpoint": path, "model.backbone_width": 64}))
    body = build_detector(cfg.model, cfg.norm, 4).backbone.body.state_dict()
    loaded = {k: v for k, v in saved.items() if not k.startswith("fc.")}
    assert loaded.keys() == body.keys()
    for k, v in loaded.items():
        assert torch.equal(body[k], v), k
    cfg = load_det(small(data_root, norm="gn", **{"model.backbone_checkpoint": path, "model.backbone_width": 64}))
    with pytest.raises(det_config.ConfigError, match="norm.layer='gn' \\(the checkpoint's: 'batchstat'\\)"):
        build_detector(cfg.model, cfg.norm, 4)


def test_validation_of_a_perfect_detector_gives_ap_100(data_root, tmp_path):
    """The task's validation path (detections -> COCO records with RLE masks -> gathered ->
    evaluator) on a "detector" that returns the ground truth: every AP is 100."""
    import contextlib
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from mabn.detection.coco import CocoDetection, collate
    from mabn.detection.task import DetectionTask
    from mabn.engine.distributed import DistInfo

    val = CocoDetection(data_root, "val", masks=True)
    truth = {int(t["image_id"]): t for _, t in (val[i] for i in range(len(val)))}
    image_ids = iter([])

    class Oracle(nn.Module):
        def forward(self, images):
            outs = []
            for _ in images:
                t = truth[next(image_ids)]
                outs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                             "masks": t["masks"][:, None].float()})
            return outs

    loader = DataLoader(val, batch_size=3, collate_fn=collate)
    image_ids = iter(int(t["image_id"]) for _, targets in loader for t in targets)
    s = SimpleNamespace(model=Oracle(), val_loader=loader, val_set=val, it=5, writer=None,
                        cfg=SimpleNamespace(schedule=SimpleNamespace(iterations=5), out_dir=str(tmp_path)),
                        di=DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")),
                        autocast=contextlib.nullcontext)
    task = DetectionTask()
    task.iou_types = ("bbox", "segm")
    res = task.evaluate(s)
    assert res["bbox_AP"] == pytest.approx(100.0) and res["segm_AP"] == pytest.approx(100.0)
    assert res["bbox_AP50"] == pytest.approx(100.0) and res["segm_AP75"] == pytest.approx(100.0)
    from mabn.lab.ap_matches import read_matches  # the final validation's matches: every box and mask found
    for iou_type in ("bbox", "segm"):
        assert read_matches(str(tmp_path), iou_type).ap() == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})


def test_table9_benchmark_prints_its_tables(data_root, tmp_path):
    """scripts/bench_detection.py on a tiny detector: training, peak memory, the 2-rank gloo SyncBN
    run and inference (as trained and folded), each a table of measured numbers."""
    out = tmp_path / "table9.md"
    r = run_script([PYTHON, "scripts/bench_detection.py", "--data", data_root, "--batch", "4", "--iters", "1",
                    "--warmup", "0", "--infer-images", "1", "--mem-steps", "1", "--networks", "BN", "MABN",
                    "--out", str(out), "+protocol=det_small", "model.min_size=64", "model.max_size=64",
                    "model.backbone_width=8", "model.fpn_channels=32", "model.fc_dim=64"])
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    for title in ("## Training", "## SyncBN: 2-rank gloo", "## RoIAlign's CPU backward", "## Inference"):
        assert title in text
    pooling = [line for line in text.splitlines() if line.startswith("| BN, ")]
    assert [line.split("|")[1].strip() for line in pooling] == ["BN, torchvision's RoIAlign", "BN, mabn's RoIAlign"]
    assert all(float(line.split("|")[4]) > 0 for line in pooling), pooling
    rows = [line for line in text.splitlines() if line.startswith("| MABN folded |") or line.startswith("| SyncBN |")]
    assert len(rows) == 2 and all(float(line.split("|")[2]) > 0 for line in rows), rows
    r = run_script([PYTHON, "scripts/bench_detection.py", "--data", str(tmp_path / "none")])
    assert r.returncode == 2 and "make_detection_data.py" in r.stderr


def _check_other_split(data_root, out, m):
    """eval_detection's --split / --images: the training split's first images (the generalization
    gap), and the validation split again with the run's own count reproduces its AP."""
    from mabn.detection.coco import CocoDetection
    from mabn.detection.evaluation import evaluate_detection_checkpoint

    metrics, matches, _ = evaluate_detection_checkpoint(str(out), split="train", images=5)
    assert matches["bbox"]["images"] == sorted(CocoDetection(data_root, "train").image_ids[:5])
    assert 0 <= metrics["bbox_AP"] <= 100
    again, _, _ = evaluate_detection_checkpoint(str(out), split="val", images=6)
    assert again["bbox_AP"] == m["bbox_AP"] and again["segm_AP"] == m["segm_AP"]
    eval_script = [PYTHON, os.path.join(REPO, "scripts", "eval_detection.py"), str(out)]
    r = run_script(eval_script + ["--split", "train", "--images", "3"])
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["split"] == "train", r.stderr[-3000:]
    r = run_script(eval_script + ["--split", "train", "--images", "5", "--record"])
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = json.loads((out / "train_eval.json").read_text())
    assert recorded["split"] == "train" and recorded["images"] == 5 and recorded["bbox_AP"] == metrics["bbox_AP"]
    for bad, said in ((["--split", "train", "--write-matches"], "takes no --split"), (["--images", "0"], "at least 1"),
                      (["--split", "nosuch"], "nosuch"), (["--record"], "--record takes --split"),
                      (["--split", "val", "--record"], "is the run's validation split")):
        r = run_script(eval_script + bad)
        assert r.returncode in (1, 2) and said in r.stderr, (bad, r.stderr[-2000:])


def test_final_matches_reproduce_box_and_mask_ap_and_eval_rewrites_them(data_root, tmp_path):
    """The final validation writes val_box_matches.json and val_mask_matches.json, whose recomputed
    APs (mabn.lab.ap_matches) are metrics.json's box and mask AP; scripts/eval_detection.py
    --write-matches rewrites the same files from the final checkpoint, and refuses a run whose
    newest checkpoint is not its final one."""
    from mabn.lab.ap_matches import read_matches

    out = tmp_path / "run"
    m = train_det(small(data_root, out, iterations=3, **{"data.val_images": 6}))
    files = {"bbox": out / "val_box_matches.json", "segm": out / "val_mask_matches.json"}
    first = {t: f.read_text() for t, f in files.items()}
    for t in files:
        assert abs(read_matches(str(out), t).ap()["AP"] - m[f"{t}_AP"]) < 1e-9, t
        assert len(json.loads(first[t])["images"]) == 6 and json.loads(first[t])["iou_type"] == t
    for f in files.values():
        f.unlink()
    r = run_script([PYTHON, os.path.join(REPO, "scripts", "eval_detection.py"), str(out), "--write-matches"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1])["bbox_AP"] == m["bbox_AP"]
    assert {t: f.read_text() for t, f in files.items()} == first
    _check_other_split(data_root, out, m)
    part = tmp_path / "part"
    train_det(small(data_root, part, iterations=4, stop_after=2, **{"data.val_images": 6}))
    # refused before evaluating: a data root that does not exist is never reached
    nowhere = ["--data-root", str(tmp_path / "nowhere")]
    r = run_script([PYTHON, os.path.join(REPO, "scripts", "eval_detection.py"), str(part), "--write-matches"] + nowhere)
    assert r.returncode == 1 and "'interrupted', not finished" in r.stderr, r.stderr[-3000:]
    assert not (part / "val_box_matches.json").exists() and not (part / "val_mask_matches.json").exists()
    r = run_script([PYTHON, os.path.join(REPO, "scripts", "eval_detection.py"), str(part), "--split", "train",
                    "--record"] + nowhere)
    assert r.returncode == 1 and "'interrupted', not finished" in r.stderr, r.stderr[-3000:]
    assert not (part / "train_eval.json").exists()
    # a record that says finished while its newest checkpoint is not the final one: refused after evaluating
    record = json.loads((part / "metrics.json").read_text())
    (part / "metrics.json").write_text(json.dumps({**record, "status": "finished"}))
    r = run_script([PYTHON, os.path.join(REPO, "scripts", "eval_detection.py"), str(part), "--split", "train",
                    "--images", "2", "--record"])
    assert r.returncode == 1 and "iteration 2, not the finished run's final one" in r.stderr, r.stderr[-3000:]
    assert not (part / "train_eval.json").exists()
