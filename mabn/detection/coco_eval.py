"""COCO evaluation of torchvision detector outputs with pycocotools' COCOeval (the reference
implementation): box AP and mask AP, the 12 numbers of COCO's summary, in percent.

Predictions are torchvision's per-image outputs, ``{image_id: {"boxes": [N, 4] xyxy, "scores":
[N], "labels": [N] (contiguous, 1..K), "masks": [N, 1, H, W] probabilities}}``; the labels are
mapped back to COCO category ids, the masks thresholded at 0.5 (as torchvision's reference does)
and RLE-encoded. Only the images in ``predictions`` are evaluated.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["SUMMARY_NAMES", "MASK_THRESHOLD", "evaluate_coco", "evaluate_coco_with_summary",
           "evaluate_results", "evaluate_results_and_matches", "coco_results", "match_records", "MATCHES_FILES",
           "SPLIT_EVAL_FILE"]

# The 12 numbers of COCOeval.summarize(), in its order.
SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                 "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
MASK_THRESHOLD = 0.5
#: Where a run keeps the final validation's :func:`match_records`, per iou type (the detection
#: tables' per-image paired tests of box AP and mask AP read them).
MATCHES_FILES = {"bbox": "val_box_matches.json", "segm": "val_mask_matches.json"}
#: A run's final AP on another split of its data set (``scripts/eval_detection.py --split S --record``),
#: e.g. ``train_eval.json``: the detection tables' fit to the training images.
SPLIT_EVAL_FILE = "{split}_eval.json"


def _numpy(values: Any) -> np.ndarray:
    """A tensor (on any device) or array-like as a numpy array."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _mask_rles(masks: Any) -> list[dict]:
    """Mask probabilities [N, 1, H, W] (or [N, H, W]) as compressed RLEs of ``> 0.5``, counts as str."""
    binary = _numpy(masks) > MASK_THRESHOLD
    if binary.ndim == 4:
        binary = binary[:, 0]
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def coco_results(predictions: Mapping[Any, Mapping[str, Any]], label_to_category_id: Any,
                 iou_type: str) -> list[dict]:
    """The detections of ``predictions`` as COCO result entries of ``iou_type`` ("bbox": xywh boxes;
    "segm": RLE masks), with category ids from ``label_to_category_id[label]``."""
    results = []
    for image_id, output in predictions.items():
        scores = _numpy(output["scores"]).astype(float).tolist()
        if not scores:
            continue
        categories = [label_to_category_id[int(label)] for label in _numpy(output["labels"])]
        if iou_type == "bbox":
            boxes = _numpy(output["boxes"]).astype(float).reshape(-1, 4)
            boxes[:, 2:] -= boxes[:, :2]
            shapes = [{"bbox": box} for box in boxes.tolist()]
        elif iou_type == "segm":
            shapes = [{"segmentation": rle} for rle in _mask_rles(output["masks"])]
        else:
            raise ValueError(f"unknown iou_type {iou_type!r} (bbox or segm)")
        for shape, category_id, score in zip(shapes, categories, scores):
            results.append({"image_id": int(image_id), "category_id": category_id, "score": score, **shape})
    return results


def _results_index(coco_gt: COCO, results: list[dict]) -> COCO:
    """pycocotools' index of the results; an empty one when there are none (loadRes fails on []).
    loadRes adds keys to the entries it is given (a mask entry gets a "bbox", which a second
    loadRes of the same entries would read as a box result): it indexes copies."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return coco_gt.loadRes([dict(r) for r in results])
        coco_dt = COCO()
        coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                           "categories": list(coco_gt.dataset["categories"]), "annotations": []}
        coco_dt.createIndex()
        return coco_dt


def _matched_evaluator(coco_gt: COCO, results: list[dict], image_ids: list[int], iou_type: str) -> COCOeval:
    """A COCOeval of one iou type over ``image_ids`` that has run ``evaluate()`` (the per-image
    matching), quietly."""
    evaluator = COCOeval(coco_gt, _results_index(coco_gt, results), iou_type)
    evaluator.params.imgIds = image_ids
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    return evaluator


def _evaluate_one(coco_gt: COCO, results: list[dict], image_ids: list[int],
                  iou_type: str) -> tuple[dict[str, float | None], str, COCOeval]:
    """COCOeval of one iou type over ``image_ids``: the summary in percent (None where COCOeval
    gives -1, i.e. no ground truth in that size range), COCOeval's printed summary, and the
    evaluator itself (its per-image matching, for :func:`_matches`)."""
    evaluator = _matched_evaluator(coco_gt, results, image_ids, iou_type)
    printed = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    with contextlib.redirect_stdout(printed):
        evaluator.summarize()
    metrics = {f"{iou_type}_{name}": (None if value < 0 else 100.0 * float(value))
               for name, value in zip(SUMMARY_NAMES, evaluator.stats)}
    return metrics, f"IoU metric: {iou_type}\n{printed.getvalue()}", evaluator


def _evaluate_all(coco_gt: COCO, results: Mapping[str, list[dict]], image_ids: Sequence[int],
                  iou_types: Sequence[str]) -> tuple[dict[str, float | None], str, dict[str, COCOeval]]:
    """:func:`_evaluate_one` for each iou type over the distinct ``image_ids``: the numbers, the
    printed summaries joined, and each iou type's evaluator."""
    image_ids = sorted({int(image_id) for image_id in image_ids})
    metrics, texts, evaluators = {}, [], {}
    for iou_type in iou_types:
        numbers, text, evaluators[iou_type] = _evaluate_one(coco_gt, list(results[iou_type]), image_ids, iou_type)
        metrics.update(numbers)
        texts.append(text)
    return metrics, "".join(texts), evaluators


def evaluate_results_and_matches(coco_gt: COCO, results: Mapping[str, list[dict]], image_ids: Sequence[int],
                                 iou_types: Sequence[str] = ("bbox", "segm"),
                                 ) -> tuple[dict[str, float | None], str, dict[str, dict]]:
    """:func:`evaluate_results` and, from the same evaluation, each iou type's per-image matches
    (:func:`match_records`' record): one COCOeval per iou type."""
    metrics, text, evaluators = _evaluate_all(coco_gt, results, image_ids, iou_types)
    return metrics, text, {t: _matches(e) for t, e in evaluators.items()}


def evaluate_results(coco_gt: COCO, results: Mapping[str, list[dict]], image_ids: Sequence[int],
                     iou_types: Sequence[str] = ("bbox", "segm")) -> tuple[dict[str, float | None], str]:
    """COCO AP/AR of result entries already made by :func:`coco_results` (e.g. gathered from
    several processes): ``results[iou_type]`` the entries, ``image_ids`` the images evaluated
    (duplicates are ignored; the results should hold each image's detections once). Returns
    :func:`evaluate_coco`'s numbers and COCOeval's printed summary text."""
    metrics, text, _ = _evaluate_all(coco_gt, results, image_ids, iou_types)
    return metrics, text


def evaluate_coco_with_summary(coco_gt: COCO, predictions: Mapping[Any, Mapping[str, Any]],
                               label_to_category_id: Any,
                               iou_types: Sequence[str] = ("bbox", "segm"),
                               ) -> tuple[dict[str, float | None], str]:
    """:func:`evaluate_coco`'s numbers and COCOeval's printed summary text (for the log)."""
    results = {t: coco_results(predictions, label_to_category_id, t) for t in iou_types}
    return evaluate_results(coco_gt, results, list(predictions), iou_types)


def evaluate_coco(coco_gt: COCO, predictions: Mapping[Any, Mapping[str, Any]],
                  label_to_category_id: Any,
                  iou_types: Sequence[str] = ("bbox", "segm")) -> dict[str, float | None]:
    """COCO AP/AR of torchvision detector outputs, in percent.

    Args:
        coco_gt: the ground truth (pycocotools COCO, e.g. ``CocoDetection.coco``).
        predictions: image_id -> that image's detector output (``boxes`` xyxy, ``scores``,
            ``labels`` contiguous, and ``masks`` [N, 1, H, W] probabilities for "segm").
            Only these images are evaluated; an image without detections counts its misses.
        label_to_category_id: label -> COCO category id (a dict, or a list indexed by label).
        iou_types: any of "bbox", "segm".

    Returns ``{"<iou_type>_<name>": value}`` for the 12 names of :data:`SUMMARY_NAMES`: percent,
    or None where the images have no ground truth of that size range (COCOeval's -1).
    """
    return evaluate_coco_with_summary(coco_gt, predictions, label_to_category_id, iou_types)[0]


def match_records(coco_gt: COCO, results: list[dict], image_ids: Sequence[int], iou_type: str = "bbox") -> dict:
    """COCOeval's per-image matching of one iou type, enough to recompute its AP on any resample of
    the images (``mabn.lab.ap_matches``: a paired bootstrap over validation images): for the area range
    "all" and the largest maxDets, every evaluated image, each (image, category)'s count of ground
    truth that is not ignored (crowd), and each detection as [image id, category id, score,
    matched, ignored], matched and ignored being bit masks over the IoU thresholds (bit t: at
    ``iou_thresholds[t]`` it matched a ground truth / it is ignored). Detections are listed in
    COCOeval's own order (category, image, descending score), so a stable sort by score gives
    its ranking. JSON-serializable."""
    return _matches(_matched_evaluator(coco_gt, results, sorted({int(i) for i in image_ids}), iou_type))


def _matches(evaluator: COCOeval) -> dict:
    """:func:`match_records`' record, read from an evaluator that has run ``evaluate()``."""
    p = evaluator.params
    all_range = [list(r) for r in p.areaRng].index(list(p.areaRng[0]))
    bits = 1 << np.arange(len(p.iouThrs))
    gt, detections = [], []
    for e in evaluator.evalImgs:
        if e is None or list(e["aRng"]) != list(p.areaRng[all_range]) or e["maxDet"] != p.maxDets[-1]:
            continue
        n_gt = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
        if n_gt:
            gt.append([int(e["image_id"]), int(e["category_id"]), n_gt])
        matched = (np.asarray(e["dtMatches"]).reshape(len(bits), -1) > 0).T @ bits
        ignored = np.asarray(e["dtIgnore"], dtype=bool).reshape(len(bits), -1).T @ bits
        for score, m, ig in zip(e["dtScores"], matched, ignored):
            detections.append([int(e["image_id"]), int(e["category_id"]), float(score), int(m), int(ig)])
    return {"iou_type": p.iouType, "iou_thresholds": [round(float(t), 4) for t in p.iouThrs],
            "recall_thresholds": len(p.recThrs), "max_detections": int(p.maxDets[-1]),
            "images": [int(i) for i in p.imgIds], "gt": gt, "detections": detections}
