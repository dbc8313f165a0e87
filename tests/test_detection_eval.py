"""mabn.detection.coco_eval: COCO AP of torchvision-style predictions through pycocotools'
COCOeval, checked on cases whose value is known or derived by hand."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mabn.detection.coco_eval import (SUMMARY_NAMES, coco_results, evaluate_coco, evaluate_coco_with_summary,
                                      evaluate_results, evaluate_results_and_matches, match_records)


def ground_truth(images, annotations, category_ids=(1,)):
    """A pycocotools COCO index of hand-written ground truth; images are (id, width, height)."""
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.png"} for i, w, h in images],
                    "annotations": annotations,
                    "categories": [{"id": c, "name": f"c{c}"} for c in category_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def box_annotation(ann_id, image_id, bbox, category_id=1, iscrowd=0, size=(100, 100)):
    """A ground-truth box xywh, with the box itself as its (RLE) mask."""
    mask = np.zeros(size, np.uint8, order="F")
    x, y, w, h = bbox
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode()
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "area": w * h, "iscrowd": iscrowd, "segmentation": rle}


def prediction(boxes_xyxy, scores, labels, size=(100, 100)):
    """A torchvision-style detector output; each mask is its box filled with probability 0.9."""
    masks = torch.zeros(len(boxes_xyxy), 1, *size)
    for k, (x1, y1, x2, y2) in enumerate(boxes_xyxy):
        masks[k, 0, y1:y2, x1:x2] = 0.9
    return {"boxes": torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}


def test_perfect_predictions_give_100_and_only_predicted_images_count():
    rng = np.random.default_rng(0)
    annotations, outputs = [], {}
    for image_id in (1, 2):  # random blob masks of two categories with non-contiguous ids 5, 9
        masks, labels = [], []
        for k in range(3):
            mask = np.zeros((60, 80), np.uint8, order="F")
            x, y = rng.integers(0, 50), rng.integers(0, 30)
            mask[y:y + 25, x:x + 20] = rng.random((25, 20)) < 0.8
            ys, xs = np.nonzero(mask)
            rle = mask_utils.encode(mask)
            rle["counts"] = rle["counts"].decode()
            label = 1 + k % 2
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": [5, 9][label - 1],
                                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                         int(ys.max() - ys.min() + 1)],
                                "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle})
            masks.append(torch.from_numpy(mask.astype(np.float32))[None])
            labels.append(label)
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in annotations[-3:]]
        outputs[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.ones(3),
                             "labels": torch.tensor(labels), "masks": torch.stack(masks)}
    coco = ground_truth([(1, 80, 60), (2, 80, 60), (3, 80, 60)], annotations, (5, 9))
    # image 3 has no predictions entry: not evaluated; image 2's misses would lower the AP
    metrics, summary = evaluate_coco_with_summary(coco, outputs, {1: 5, 2: 9})
    assert metrics["bbox_AP"] == pytest.approx(100) and metrics["segm_AP"] == pytest.approx(100)
    assert set(metrics) == {f"{t}_{n}" for t in ("bbox", "segm") for n in SUMMARY_NAMES}
    assert "IoU metric: segm" in summary and "Average Precision" in summary
    only_first = evaluate_coco(coco, {1: outputs[1]}, [None, 5, 9], iou_types=("bbox",))  # a list mapping
    assert only_first["bbox_AP"] == pytest.approx(100) and "segm_AP" not in only_first
    with_miss = evaluate_coco(coco, {1: outputs[1], 2: prediction([], [], [])}, {1: 5, 2: 9}, ("bbox",))
    assert with_miss["bbox_AR100"] == pytest.approx(50)


def test_hand_computed_average_precision():
    # Two ground truths in one image; detection 1 is exactly ground truth 1 (score 0.9),
    # detection 2 overlaps nothing (score 0.8); ground truth 2 is missed.
    coco = ground_truth([(1, 100, 100)], [box_annotation(1, 1, (10, 10, 20, 20)),
                                         box_annotation(2, 1, (60, 60, 20, 20))])
    output = prediction([[10, 10, 30, 30], [40, 0, 50, 10]], [0.9, 0.8], [1, 1])
    metrics = evaluate_coco(coco, {1: output}, {1: 1})
    # COCO's AP: precision and recall after each detection in score order, the precision made
    # non-increasing (max over the detections from there on), then read at the 101 recall
    # thresholds 0, 0.01, ..., 1 at the first detection reaching that recall (0 if none), averaged.
    precision, recall = [1 / 1, 1 / 2], [1 / 2, 1 / 2]
    envelope = [max(precision[i:]) for i in range(len(precision))]
    thresholds = np.linspace(0.0, 1.0, 101)
    sampled = [next((p for p, r in zip(envelope, recall) if r >= t), 0.0) for t in thresholds]
    expected = 100 * sum(sampled) / len(thresholds)  # thresholds 0..0.50 read 1: 51 / 101
    assert expected == pytest.approx(100 * 51 / 101)
    for iou_type in ("bbox", "segm"):  # the IoUs are 1 and 0: the same at every IoU threshold
        for name in ("AP", "AP50", "AP75", "APs"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(expected)
        assert metrics[f"{iou_type}_AR100"] == pytest.approx(50)
        assert metrics[f"{iou_type}_APm"] is None and metrics[f"{iou_type}_APl"] is None  # no such ground truth


def test_crowd_ground_truth_is_no_miss_and_absorbs_its_detections():
    coco = ground_truth([(1, 100, 100)], [box_annotation(1, 1, (10, 10, 30, 30)),
                                         box_annotation(2, 1, (60, 60, 30, 30), iscrowd=1)])
    only_object = prediction([[10, 10, 40, 40]], [0.9], [1])
    assert evaluate_coco(coco, {1: only_object}, {1: 1})["bbox_AP"] == pytest.approx(100)
    on_crowd_too = prediction([[62, 62, 88, 88], [10, 10, 40, 40]], [0.95, 0.9], [1, 1])
    metrics = evaluate_coco(coco, {1: on_crowd_too}, {1: 1})
    assert metrics["bbox_AP"] == pytest.approx(100) and metrics["segm_AP"] == pytest.approx(100)


def test_empty_predictions_give_zero():
    coco = ground_truth([(1, 100, 100), (2, 100, 100)], [box_annotation(1, 1, (10, 10, 20, 20)),
                                                         box_annotation(2, 2, (0, 0, 50, 50))])
    empty = {1: prediction([], [], []), 2: prediction([], [], [])}
    metrics, summary = evaluate_coco_with_summary(coco, empty, {1: 1})
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "AR1", "AR10", "AR100", "ARs", "ARm"):
            assert metrics[f"{iou_type}_{name}"] == 0.0
        assert metrics[f"{iou_type}_APl"] is None and metrics[f"{iou_type}_ARl"] is None
    assert "Average Recall" in summary


def test_known_iou_counts_at_ap50_not_ap75():
    coco = ground_truth([(1, 200, 200)], [box_annotation(1, 1, (0, 0, 100, 100), size=(200, 200))])
    # the prediction is the top 62 rows of the ground truth: IoU = 6200 / 10000 = 0.62
    output = prediction([[0, 0, 100, 62]], [0.7], [1], size=(200, 200))
    metrics = evaluate_coco(coco, {1: output}, {1: 1})
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}_AP50"] == pytest.approx(100)
        assert metrics[f"{iou_type}_AP75"] == 0.0
        # matched at the IoU thresholds 0.50, 0.55, 0.60 of the ten 0.50:0.05:0.95
        assert metrics[f"{iou_type}_AP"] == pytest.approx(30)
        assert metrics[f"{iou_type}_APl"] == pytest.approx(30)
        assert metrics[f"{iou_type}_APs"] is None and metrics[f"{iou_type}_APm"] is None


def test_evaluate_results_of_gathered_entries_matches_evaluate_coco():
    coco = ground_truth([(1, 100, 100), (2, 100, 100)], [box_annotation(1, 1, (10, 10, 20, 20)),
                                                         box_annotation(2, 2, (0, 0, 50, 50))])
    outputs = {1: prediction([[10, 10, 30, 30]], [0.9], [1]), 2: prediction([[0, 0, 50, 31]], [0.8], [1])}
    outputs[2]["labels"] = outputs[2]["labels"].float()  # labels as a float tensor are accepted
    per_rank = [{t: coco_results({i: outputs[i]}, {1: 1}, t) for t in ("bbox", "segm")} for i in (1, 2)]
    gathered = {t: per_rank[0][t] + per_rank[1][t] for t in ("bbox", "segm")}
    metrics, text = evaluate_results(coco, gathered, [2, 1, 2])  # a repeated id counts once
    assert metrics == evaluate_coco(coco, outputs, {1: 1})
    # image 2's box has IoU 31/50 = 0.62: at IoU 0.75 it is a false positive after a true positive,
    # as in test_hand_computed_average_precision: 51 of the 101 recall thresholds read precision 1
    assert metrics["bbox_AP50"] == pytest.approx(100) and metrics["bbox_AP75"] == pytest.approx(100 * 51 / 101)
    assert text.count("IoU metric") == 2
    assert per_rank[1]["bbox"][0]["bbox"] == [0, 0, 50, 31]  # xywh
    assert isinstance(per_rank[1]["segm"][0]["segmentation"]["counts"], str)


def test_matches_read_from_the_evaluation_equal_a_separate_matching():
    coco = ground_truth([(1, 100, 100), (2, 100, 100)], [box_annotation(1, 1, (10, 10, 20, 20)),
                                                         box_annotation(2, 2, (0, 0, 50, 50))])
    outputs = {1: prediction([[10, 10, 30, 30], [60, 60, 90, 90]], [0.9, 0.3], [1, 1]),
               2: prediction([[0, 0, 50, 31]], [0.8], [1])}
    results = {t: coco_results(outputs, {1: 1}, t) for t in ("bbox", "segm")}
    metrics, text, matches = evaluate_results_and_matches(coco, results, [2, 1])
    assert (metrics, text) == evaluate_results(coco, results, [2, 1])
    for iou_type in ("bbox", "segm"):
        assert matches[iou_type] == match_records(coco, results[iou_type], [1, 2], iou_type)
        assert matches[iou_type]["iou_type"] == iou_type and matches[iou_type]["images"] == [1, 2]
        assert len(matches[iou_type]["detections"]) == 3
