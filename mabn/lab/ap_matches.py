"""Box or mask AP recomputed from COCOeval's per-image matches, on any weighting of the validation
images: the per-image paired tests of the detection tables (a bootstrap over seeds and images, as the
classifier's :func:`mabn.lab.verdicts.paired_bootstrap`), so that the validation images' sampling
error is counted once for both rows.

A run's ``val_box_matches.json`` (and, for Mask R-CNN, ``val_mask_matches.json``: the files of
:data:`mabn.detection.coco_eval.MATCHES_FILES`, written at the final validation by the detection
task from :func:`mabn.detection.coco_eval.match_records`) lists every evaluated image, each
(image, category)'s ground-truth count and each detection's score and matches at the ten IoU
thresholds (box IoU, or mask IoU).
:meth:`ApMatches.ap` is COCOeval.accumulate()'s AP for the area range "all" and 100 detections
per image: per category with ground truth and per IoU threshold, the detections ranked by score
(a stable sort, COCOeval's order), precision made monotone from the right and read at the 101
recall points, averaged. An image drawn w times counts w times (its ground truth and its
detections), exactly as COCOeval on a data set holding w copies of it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mabn.detection.coco_eval import MATCHES_FILES

from .verdicts import shared_seeds

__all__ = ["ApMatches", "read_matches", "paired_ap_bootstrap", "AP_REPLICATES"]

#: Bootstrap replicates of the detection tables' per-image test (each needs two AP computations
#: per drawn seed).
AP_REPLICATES = 1000


class ApMatches:
    """One run's matches, indexed for fast AP on reweighted images."""

    def __init__(self, record: dict):
        self.images = [int(i) for i in record["images"]]
        index = {image: k for k, image in enumerate(self.images)}
        self.thresholds = record["iou_thresholds"]
        self.recall = np.linspace(0.0, 1.0, int(record["recall_thresholds"]))
        bits = 1 << np.arange(len(self.thresholds))
        gt_by_cat: dict[int, np.ndarray] = {}
        for image, cat, n in record["gt"]:
            gt_by_cat.setdefault(int(cat), np.zeros(len(self.images)))[index[int(image)]] += n
        dets = record["detections"]
        self.categories = []
        for cat in sorted(gt_by_cat):
            mine = [d for d in dets if int(d[1]) == cat]
            order = np.argsort(-np.array([d[2] for d in mine], dtype=np.float64), kind="mergesort")
            image = np.array([index[int(mine[k][0])] for k in order], dtype=np.int64)
            matched = (np.array([mine[k][3] for k in order], dtype=np.int64)[None, :] & bits[:, None]) > 0
            ignored = (np.array([mine[k][4] for k in order], dtype=np.int64)[None, :] & bits[:, None]) > 0
            self.categories.append((gt_by_cat[cat], image, matched & ~ignored, ~matched & ~ignored))

    def ap(self, weights: np.ndarray | None = None) -> dict[str, float]:
        """AP, AP50 and AP75 in percent; ``weights[k]``: how many times image k counts (default 1)."""
        w = np.ones(len(self.images)) if weights is None else np.asarray(weights, dtype=np.float64)
        precision = [self._category_precision(w, *c) for c in self.categories]
        precision = [p for p in precision if p is not None]
        if not precision:
            return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
        q = np.stack(precision)  # category x threshold x recall point
        t50, t75 = self.thresholds.index(0.5), self.thresholds.index(0.75)
        return {"AP": 100 * float(q.mean()), "AP50": 100 * float(q[:, t50].mean()),
                "AP75": 100 * float(q[:, t75].mean())}

    def _category_precision(self, w, gt, image, tp, fp) -> np.ndarray | None:
        """The interpolated precision (threshold x recall point) of one category; None when the
        weighted images hold none of its ground truth (COCOeval leaves such a category out)."""
        n_gt = float(w @ gt)
        if n_gt == 0:
            return None
        q = np.zeros((tp.shape[0], len(self.recall)))
        if tp.shape[1] == 0:
            return q
        wd = w[image]
        tp_sum, fp_sum = np.cumsum(tp * wd, axis=1), np.cumsum(fp * wd, axis=1)
        rc = tp_sum / n_gt
        pr = tp_sum / (tp_sum + fp_sum + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
        for t in range(tp.shape[0]):
            idx = np.searchsorted(rc[t], self.recall, side="left")
            inside = idx < rc.shape[1]
            q[t, inside] = pr[t, idx[inside]]
        return q


def read_matches(run_dir: str, iou_type: str = "bbox") -> ApMatches | None:
    """The run's matches of ``iou_type`` ("bbox": ``val_box_matches.json``, "segm":
    ``val_mask_matches.json``) as :class:`ApMatches`; None without the file."""
    path = os.path.join(run_dir, MATCHES_FILES[iou_type])
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return ApMatches(json.load(f))


def paired_ap_bootstrap(a: dict[int, ApMatches], b: dict[int, ApMatches], key: str = "AP", level: float = 0.95,
                        replicates: int = AP_REPLICATES, seed: int = 0) -> tuple[float, float, float, int]:
    """The AP gap (points) of row a over row b on the same validation images, with a percentile
    interval of a two-way bootstrap: each replicate draws the seeds with replacement and,
    independently, the images with replacement (the same images for both rows and every seed),
    and takes the mean over the drawn seeds of AP_a - AP_b on the drawn images. Only the seeds both
    rows have are used. Returns the observed gap, the interval's bounds and the number of seeds."""
    seeds = shared_seeds(a, b, "matches",
                         lambda x, y: x.images != y.images and "the two rows were validated on different images")
    n_images = len(a[seeds[0]].images)
    observed = float(np.mean([a[s].ap()[key] - b[s].ap()[key] for s in seeds]))
    rng = np.random.Generator(np.random.PCG64(seed))
    stats = np.empty(replicates)
    for k in range(replicates):
        drawn = rng.integers(0, len(seeds), len(seeds))
        w = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images).astype(np.float64)
        gap = {i: a[seeds[i]].ap(w)[key] - b[seeds[i]].ap(w)[key] for i in set(drawn.tolist())}
        stats[k] = np.mean([gap[i] for i in drawn])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return observed, float(lo), float(hi), len(seeds)
