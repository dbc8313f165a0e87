"""Train a ResNet on ImageNet (or any ImageFolder, or synthetic data) with any mabn normalization.

    python train_imagenet.py                                   # quickstart: synthetic data, CPU, minutes
    torchrun --nproc_per_node=8 train_imagenet.py experiment=table2_row8_mabn data.root=/data/imagenet
    python train_imagenet.py norm=brn data=imagefolder data.root=../shared/data/tiny-imagenet-10 schedule=short
    python train_imagenet.py out_dir=runs/x resume=auto        # continue from the newest checkpoint

Hydra overrides select config groups (norm, model, data, schedule, optim, experiment; see
configs/) and set any field documented in mabn/engine/config.py. The steps:

1. compose the config (Hydra) and validate it: a bad value stops here, naming the key (exit 2);
2. train (mabn/engine/trainer.py): set up torchrun/DDP, resume if asked, build data and model,
   run the iteration loop with logging, validation, checkpoints;
3. the run directory's metrics.json says how it ended: finished, diverged or interrupted (all
   exit 0: divergence and pre-emption are results, not crashes), or failed (exit 1: a crash, a
   full disk; exit 130: a second Ctrl-C).

Exit statuses (mabn/engine/cli.py; one line on stderr for each but 0; Hydra itself exits with 1
on an unknown key or preset):

- 0: the run ended as designed (metrics.json: finished, diverged or interrupted), or it had
  already finished;
- 1: it failed (metrics.json: failed, with the error, once out_dir was this run's): a crash (with
  its traceback), or a full disk or another OSError, or a checkpoint that could not be written
  (one line);
- 2: refused before any work, nothing written: an invalid value, a machine that cannot run it, a
  resume that does not fit its checkpoint, unusable checkpoints;
- 3: out_dir is in use by another run (its lock is held): nothing written; the same command works
  once that run has ended;
- 130: a second Ctrl-C (no checkpoint; metrics.json: failed).
"""

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from mabn.engine import cli, config

# The schema: every field with its type and documentation (mabn/engine/config.py).
ConfigStore.instance().store(name="mabn_schema", node=config.Config)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cli.main(cfg)  # validate, train; every ending is an exit status (mabn/engine/cli.py)


if __name__ == "__main__":
    main()
