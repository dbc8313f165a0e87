#!/usr/bin/env python
"""Evaluate detection checkpoints (scripts/train_detection.py runs): COCO box (and mask) AP on the
validation split (or, with --split, another split of its data set), one JSON line per run on stdout.

    python scripts/eval_detection.py runs/det_table3/det_small_x2/table3_mabn/seed0        # newest checkpoint
    python scripts/eval_detection.py runs/det_table3/det_small_x2/*/seed* --write-matches     # + val_*_matches.json
    python scripts/eval_detection.py runs/det_table3/det_small_x2/*/seed0 --split train --images 250  # fit to the training images
    python scripts/eval_detection.py runs/det_table3/det_small_x2/*/seed* --split train --images 250 --record

--record (with --split) writes that evaluation into the run as ``<split>_eval.json``
(``coco_eval.SPLIT_EVAL_FILE``, the JSON line printed), which the detection tables show beside the
validation AP; like --write-matches, only from a finished run's final checkpoint.

--write-matches writes the run's ``val_box_matches.json`` and, for Mask R-CNN, ``val_mask_matches.json``
(COCOeval's per-image matches, which the detection tables' per-image paired tests read) for runs
that finished before the trainer wrote them: only from the run's final checkpoint (iteration =
schedule.iterations), only when this evaluation reproduces the box (and mask) AP in its
metrics.json (to 1e-6), and atomically, all of a run's files or none. Exit status 1 if
any run could not be evaluated or did not reproduce; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from omegaconf import OmegaConf

from mabn.detection.coco_eval import MATCHES_FILES, SPLIT_EVAL_FILE
from mabn.detection.evaluation import evaluate_detection_checkpoint
from mabn.engine import checkpoint, files
from mabn.engine.config import ConfigError


def evaluate_run(run_dir: str, data_root: str | None, write: bool, split: str | None = None,
                 images: int | None = None, record: bool = False) -> dict:
    if record and split == _val_split(run_dir):
        raise ValueError(f"--split {split!r} is the run's validation split (data.val_split): its AP is metrics.json's; "
                         "--record takes another split")
    if record or write:
        _finished_record(run_dir)  # refused before the evaluation, not after it
    metrics, matches, iteration = evaluate_detection_checkpoint(run_dir, data_root, split, images)
    line = {"run": run_dir, "iteration": iteration, **({"split": split} if split else {}),
            **({"images": images} if images is not None else {}),
            **{k: metrics[k] for k in metrics if k.endswith(("AP", "AP50", "AP75"))}}
    if record:
        _final_record(run_dir, iteration)
        path = os.path.join(run_dir, SPLIT_EVAL_FILE.format(split=split))
        files.atomic_write({path: json.dumps(line) + "\n"})
        return {**line, "wrote": [path]}
    if not write:
        return line
    recorded = _final_record(run_dir, iteration)
    for t in matches:
        if abs(metrics[f"{t}_AP"] - recorded[f"{t}_AP"]) > 1e-6:
            raise ValueError(f"{run_dir}: {t}_AP {metrics[f'{t}_AP']:.6f} does not reproduce metrics.json's "
                             f"{recorded[f'{t}_AP']:.6f}; nothing written")
    paths = {os.path.join(run_dir, MATCHES_FILES[t]): json.dumps(m) for t, m in matches.items()}
    files.atomic_write(paths)
    return {**line, "wrote": sorted(paths)}


def _val_split(run_dir: str) -> str:
    """The validation split the run was trained with (its config.yaml's data.val_split)."""
    return OmegaConf.load(os.path.join(run_dir, "config.yaml")).data.val_split


def _finished_record(run_dir: str) -> dict:
    """The run's metrics.json, when the run has finished (status "finished")."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        recorded = json.load(f)
    if recorded.get("status") != "finished":
        raise ValueError(f"{run_dir}: the run is {recorded.get('status')!r}, not finished; --record and "
                         "--write-matches take a finished run's final checkpoint")
    return recorded


def _final_record(run_dir: str, iteration: int) -> dict:
    """The run's metrics.json, when the evaluated checkpoint is its finished run's final one."""
    recorded = _finished_record(run_dir)
    if iteration != recorded.get("iterations"):
        raise ValueError(f"{run_dir}: the newest checkpoint is iteration {iteration}, not the finished run's final one")
    return recorded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (their newest checkpoint) or checkpoint files")
    p.add_argument("--data-root", help="the data set's folder, when it moved since training (data.root)")
    p.add_argument("--write-matches", action="store_true", help="write val_box_matches.json (and val_mask_matches.json) into each run")
    p.add_argument("--split", help="evaluate this split of the run's data set (e.g. train, without augmentation) "
                                   "instead of its validation split")
    p.add_argument("--images", type=int, help="only the first IMAGES images of the split evaluated")
    p.add_argument("--record", action="store_true", help="with --split: write the evaluation into each run "
                                                         "as <split>_eval.json (final checkpoints only)")
    args = p.parse_args(argv)
    if args.record and (not args.split or args.write_matches):
        print("--record takes --split with a split other than the run's validation split, and no --write-matches",
              file=sys.stderr)
        return 2
    if args.write_matches and (args.split or args.images is not None):
        print("--write-matches writes the validation split's matches of the run as trained; it takes no "
              "--split or --images", file=sys.stderr)
        return 2
    if args.images is not None and args.images < 1:
        print(f"--images must be at least 1, got {args.images}", file=sys.stderr)
        return 2
    failed = 0
    for run_dir in args.runs:
        if (args.write_matches or args.record) and not os.path.isdir(run_dir):
            print(f"--write-matches and --record take run directories; {run_dir!r} is not one", file=sys.stderr)
            return 2
        try:
            line = evaluate_run(run_dir, args.data_root, args.write_matches, args.split, args.images, args.record)
            print(json.dumps(line), flush=True)
        except (checkpoint.CheckpointError, ConfigError, ValueError, OSError) as e:
            print(f"{run_dir}: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
