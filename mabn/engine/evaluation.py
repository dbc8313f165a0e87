"""Evaluate a checkpoint: top-1/top-5 error on centre crops of a validation set."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from .. import fold
from . import checkpoint, config, data, distributed, models, run
from .meters import evaluate

__all__ = ["resolve_checkpoint", "saved_config", "evaluate_checkpoint", "inference_model", "FORMS",
           "RENAMED_KEYS"]

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> tuple[dict, str]:
    """A checkpoint file, or a run directory (its newest usable checkpoint)."""
    if os.path.isdir(path):
        ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        found = checkpoint.load_latest(ckpt_dir)
        if found is None:
            raise checkpoint.CheckpointError(f"no usable checkpoint in {ckpt_dir}")
        return found
    return checkpoint.load(path), path


FORMS = ("trained", "folded", "torchvision")


def inference_model(model: torch.nn.Module, form: str, model_cfg, num_classes: int) -> torch.nn.Module:
    """The eval-mode ``model`` as trained, folded (mabn.fold.fold_model: plain convs with bias, no
    normalization), or exported into a stock torchvision ResNet (strict state_dict load)."""
    if form not in FORMS:
        raise config.ConfigError(f"form={form!r} is not one of {list(FORMS)}")
    model.eval()
    if form == "folded":
        return fold.fold_model(model)
    if form == "torchvision":
        stock = models.build_stock_model(model_cfg, num_classes)
        stock.load_state_dict(fold.export_torchvision_state_dict(model), strict=True)
        return stock.eval()
    return model


#: Config keys renamed since checkpoints were first written (see mabn.engine.config).
RENAMED_KEYS = config.RENAMED_KEYS


def saved_config(state: dict) -> DictConfig:
    """The (mutable) config a checkpoint was trained with, with renamed keys brought up to date."""
    return config.upgrade_saved_config(state["config"])


def evaluate_checkpoint(path: str, overrides: list[str] | Callable[[DictConfig], DictConfig] | None = None,
                        device: str | None = None, form: str = "trained") -> dict:
    """Load ``path`` with the config it was trained with, changed by ``overrides``, evaluate it on
    that config's validation set (single process or torchrun) and write ``<checkpoint>.eval.json``
    (``.eval-<form>.json`` for the folded or torchvision forms, see :func:`inference_model`).
    Returns the result.

    Args:
        overrides: a dotlist such as ``["data.root=/data/imagenet"]``, or a function that receives
            the checkpoint's config (a mutable DictConfig) and returns the config to use (eval.py
            passes one that applies its Hydra command line).
        device: overrides the config's ``device`` when given.
    """
    state, ckpt_path = resolve_checkpoint(path)
    cfg = saved_config(state)
    if callable(overrides):
        cfg = overrides(cfg)
    else:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
    if device is not None:
        cfg.device = device
    cfg.resume, cfg.compile = "none", False  # evaluation runs the uncompiled model
    cfg = config.load(cfg)
    config.check_machine(cfg)
    config.check_checkpoint_fits(state["config"], cfg, state["iteration"], f"ckpt: the checkpoint {ckpt_path}",
                                 scope="model")
    di = distributed.setup(cfg.device)
    try:
        run.setup_logging(None, di.is_main, stream=sys.stderr)  # stdout carries the JSON
        _, val_set, num_classes = data.build_datasets(cfg.data, cfg.seed, train=False)
        loader = data.build_val_loader(val_set, cfg.data, di.rank, di.world_size, di.device)
        model = models.build_model(cfg.model, cfg.norm, cfg.model.num_classes or num_classes)
        models.load_weights({"model": model}, state)
        model = inference_model(model, form, cfg.model, cfg.model.num_classes or num_classes)
        model.to(di.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        res = evaluate(model, loader, di.device, cfg.channels_last,
                       torch.autocast(di.device.type, dtype=amp) if amp else None)
        result = {"checkpoint": os.path.abspath(ckpt_path), "iteration": state["iteration"],
                  "top1_err": res["top1_err"], "top5_err": res["top5_err"], "samples": res["samples"],
                  "data": cfg.data.name, "val": os.path.join(cfg.data.root, cfg.data.val_dir) if cfg.data.root else None,
                  "world_size": di.world_size, "form": form}
        if di.is_main:
            out = os.path.splitext(ckpt_path)[0] + (".eval.json" if form == "trained" else f".eval-{form}.json")
            run.write_json(out, result)
            result["output"] = out
            log.info("%s (iteration %d): top-1 error %.2f%%, top-5 error %.2f%% on %d images -> %s",
                     ckpt_path, state["iteration"], res["top1_err"], res["top5_err"], res["samples"], out)
        return result
    finally:
        distributed.cleanup()
