"""Evaluate a checkpoint: top-1/top-5 error on centre crops of its validation set.

    python eval.py runs/quickstart                                   # newest checkpoint of a run
    python eval.py runs/x/checkpoints/ckpt_0600000.pt data.root=/data/imagenet
    torchrun --nproc_per_node=8 eval.py runs/x data.batch_size=100
    python eval.py runs/quickstart --form folded        # normalization folded into the convs
    python eval.py runs/quickstart --form torchvision   # exported into a stock torchvision ResNet

The checkpoint carries the config it was trained with; ``key=value`` arguments override it
(e.g. a different data.root or eval batch size). The result is printed and written next to the
checkpoint as ``ckpt_<iteration>.eval.json``.
"""

import argparse
import json
import sys

from mabn.engine import checkpoint, config
from mabn.engine.evaluation import FORMS, evaluate_checkpoint


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file, or a run directory (its newest valid checkpoint)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.root=/data/imagenet")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: the run's")
    p.add_argument("--form", choices=FORMS, default="trained",
                   help="evaluate the model as trained, folded (mabn.fold.fold_model) or exported into "
                        "stock torchvision (mabn.fold.export_torchvision_state_dict); all give the same error")
    args = p.parse_args()
    try:
        result = evaluate_checkpoint(args.checkpoint, args.overrides, args.device, args.form)
    except (config.ConfigError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "output" in result:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
