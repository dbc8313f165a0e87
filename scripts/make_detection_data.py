#!/usr/bin/env python
"""Build the small real-photograph instance-segmentation data set (COCO format) of
mabn.detection.synthetic into OUT: objects cut from photographs through random shapes, pasted
onto mosaics of other photographs. Deterministic: the same seed gives byte-identical files.

    python scripts/make_detection_data.py /tmp/detdata --seed 0
    python scripts/make_detection_data.py OUT --seed 1 --source DIR --train-images 500 --val-images 100

A bad argument, a non-empty OUT or a missing source prints one line ``error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from mabn.detection.coco import DatasetError
from mabn.detection.synthetic import build_detection_dataset, default_source


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line ``error: ...`` on stderr and exit status 2."""

    def error(self, message: str):
        """Print ``error: message`` and exit with status 2 (argparse prints usage too)."""
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = _OneLineParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder to create (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="the data set's seed (default 0)")
    parser.add_argument("--source", default=None, help=f"ImageFolder of photographs (default {default_source()})")
    parser.add_argument("--train-images", type=int, default=2000, help="images of the train split (default 2000)")
    parser.add_argument("--val-images", type=int, default=250, help="images of the val split (default 250)")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square images (default 128)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the data set and print its summary (JSON); 2 with one error line on failure."""
    args = parse_args(argv)
    try:
        summary = build_detection_dataset(args.out, seed=args.seed, source=args.source,
                                          train_images=args.train_images, val_images=args.val_images,
                                          image_size=args.image_size)
    except (DatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
