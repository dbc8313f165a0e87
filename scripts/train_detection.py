"""Train a detector (Mask R-CNN, Faster R-CNN, RetinaNet with ResNet-FPN) from scratch with any
normalization of the `norm` group, on COCO or any COCO-format data set.

    python scripts/make_detection_data.py data/det-tiny10 --seed 0      # the small data set, once
    python scripts/train_detection.py                                    # default: small Mask R-CNN, MABN, CPU
    python scripts/train_detection.py norm=bn_small data.root=data/det-tiny10 schedule.iterations=50 out_dir=runs/x
    python scripts/train_detection.py det_experiment=table3_mabn +protocol=det_small   # Table 3 row, CPU scale
    torchrun --nproc_per_node=8 scripts/train_detection.py det_experiment=table3_mabn data.root=/data/coco

The keys are the classifier's (train_imagenet.py) where the meaning is the same, with the
detector's `model` and `data` (mabn/detection/config.py); the run directory, resume=auto,
SIGTERM, the out_dir lock, metrics.json (bbox_AP, bbox_AP50, ..., segm_AP, ...), TensorBoard and
the exit statuses (mabn/engine/cli.py) are the shared trainer's.
"""

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from mabn.detection import config
from mabn.detection.task import DetectionTask
from mabn.engine import cli

# The schema: every field with its type and documentation (mabn/detection/config.py).
ConfigStore.instance().store(name="detection_schema", node=config.DetectionConfig)


@hydra.main(config_path="../configs", config_name="detection", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cli.main(cfg, load=config.load, task=DetectionTask())


if __name__ == "__main__":
    main()
