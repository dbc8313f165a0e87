"""The command line of a training script (train_imagenet.py, scripts/train_detection.py): the
validated config is trained, and every way a run can end becomes its exit status.

Exit statuses (one line on stderr for each but 0):

- 0: the run ended as designed (metrics.json: finished, diverged or interrupted), or it had
  already finished;
- 1: it failed (metrics.json: failed, with the error, once out_dir was this run's): a crash (with
  its traceback), or a full disk or another OSError, or a checkpoint that could not be written;
- 2: refused before any work, nothing written: an invalid value, a bad data set, a machine that
  cannot run it, a resume that does not fit its checkpoint, unusable checkpoints;
- 3: out_dir is in use by another run (its lock is held): nothing written;
- 130: a second Ctrl-C (no checkpoint; metrics.json: failed).
"""

from __future__ import annotations

import json
import sys

from omegaconf import DictConfig, OmegaConf

from . import checkpoint, config, run, trainer

__all__ = ["main", "EXIT_FAILED", "EXIT_REFUSED", "EXIT_OUT_DIR_IN_USE", "EXIT_SECOND_CTRL_C"]

#: Exit statuses (see the module docstring).
EXIT_FAILED, EXIT_REFUSED, EXIT_OUT_DIR_IN_USE, EXIT_SECOND_CTRL_C = 1, 2, 3, 130


def main(cfg: DictConfig, load=config.load, task=None) -> None:
    """Validate ``cfg`` with ``load`` (before any work), then train it with ``task`` (the
    classifier's by default); exits with the status of the module docstring."""
    try:
        cfg = load(cfg)
        if cfg.dry_run:  # what this (multi)run job would train; nothing else
            print("DRY-RUN " + json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True), flush=True)
            return
        trainer.train(cfg, task)  # ConfigError here: refused before training
    except config.ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    except run.OutDirInUse as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_OUT_DIR_IN_USE)
    except checkpoint.CheckpointError as e:  # e.g. a full disk; metrics.json says "failed"
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except OSError as e:  # a full disk, an unreadable file: the machine's, not a bug; metrics.json says "failed"
        print(f"error: {run.one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:  # a second Ctrl-C; metrics.json says "failed"
        print("stopped by a second Ctrl-C, without a checkpoint (the last one written stays)", file=sys.stderr)
        sys.exit(EXIT_SECOND_CTRL_C)
