"""Evaluate a checkpoint: top-1/top-5 error on centre crops of its validation set.

    python eval.py ckpt=runs/quickstart                                  # newest checkpoint of a run
    python eval.py ckpt=runs/x/checkpoints/ckpt_0600000.pt data.root=/data/imagenet
    python eval.py ckpt=runs/x data=imagefolder data.root=../shared/data/tiny-imagenet-10
    torchrun --nproc_per_node=8 eval.py ckpt=runs/x data.eval_batch_size=100
    python eval.py ckpt=runs/quickstart form=folded        # normalization folded into the convs
    python eval.py ckpt=runs/quickstart form=torchvision   # exported into a stock torchvision ResNet

The same Hydra grammar as train_imagenet.py (configs/eval.yaml; schema: mabn/engine/config.py's
``Config`` plus ``ckpt`` and ``form``, see ``EvalConfig``). The checkpoint carries the config it
was trained with; the command line changes only what it names:

- ``key=value`` (``data.root=...``, ``data.eval_batch_size=...``, ``device=cpu``, ...) sets that
  key of the checkpoint's config;
- ``group=option`` (``data=imagefolder``; the groups norm, model, data, schedule, optim; not
  ``experiment``: the checkpoint's config is its experiment) replaces that whole section by the
  group's file, composed as training composes it (schema defaults, the file, then the command
  line's ``group.key=value`` overrides).

The model and its normalization (``model.*``, ``norm.*``) are the checkpoint's: an override that
changes them is refused with the line training gives for a resume that does not fit (exit 2).

The result is printed as JSON on stdout and written next to the checkpoint as
``ckpt_<iteration>.eval.json`` (``.eval-<form>.json`` for form=folded|torchvision). An invalid
value, an unusable checkpoint or one that does not fit the model exits with 2 and one line on
stderr (Hydra itself exits with 1 on an unknown key or group option, e.g. ``experiment=...``); a
failed write of the result (a full disk) exits with 1 and one line.
"""

import json
import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

from mabn.engine import checkpoint, config, run
from mabn.engine.evaluation import evaluate_checkpoint

ConfigStore.instance().store(name="mabn_eval_schema", node=config.EvalConfig)

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
#: Keys of the eval command line that are not part of the checkpoint's config.
EVAL_KEYS = ("ckpt", "form")


def checkpoint_overrides(cfg: DictConfig, overrides: list[str]):
    """A function applying the command line's ``overrides`` (as composed by Hydra into ``cfg``) to
    a checkpoint's config: whole sections for group overrides, then single keys."""
    groups, keys = [], []  # Hydra has already refused unknown keys and group options
    for o in OverridesParser.create().parse_overrides(overrides):
        name = o.key_or_group
        if name in EVAL_KEYS:
            continue
        if o.is_add() or o.is_delete() or o.package:
            raise config.ConfigError(f"{o.input_line!r}: eval.py takes group=option and key=value overrides "
                                     f"of the checkpoint's config")
        if "." not in name and os.path.isdir(os.path.join(CONFIGS, name)):
            groups.append(name)
        else:
            keys.append(name)

    def apply(saved: DictConfig) -> DictConfig:
        for name in groups:
            saved[name] = OmegaConf.to_container(cfg[name], resolve=True)
        for name in keys:
            value = OmegaConf.select(cfg, name)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
            OmegaConf.update(saved, name, value, merge=False)
        return saved

    return apply


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        if OmegaConf.is_missing(cfg, "ckpt"):
            raise config.ConfigError("ckpt is required: ckpt=<checkpoint file or run directory>")
        apply = checkpoint_overrides(cfg, list(HydraConfig.get().overrides.task))
        result = evaluate_checkpoint(cfg.ckpt, apply, form=cfg.form)
    except (config.ConfigError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. a full disk while writing the result
        print(f"error: {run.one_line(e)}", file=sys.stderr)
        sys.exit(1)
    if "output" in result:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
