"""mabn.lab.ap_matches: box AP recomputed from COCOeval's per-image matches equals pycocotools' own
AP, on the images as they are and on a resample (images counted twice or dropped: pycocotools on a
data set holding copies of them); and the paired bootstrap over seeds and images."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mabn.detection.coco_eval import match_records
from mabn.lab.ap_matches import ApMatches, paired_ap_bootstrap


def random_case(seed, n_images=12, categories=(3, 7, 8), quality=0.7):
    """Ground truth (a crowd box among them) and detections: jittered ground truth boxes (the worse
    the quality, the larger the jitter and the fewer found) plus random false positives."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"})
        for _ in range(rng.integers(0, 4)):
            x, y, w, h = rng.uniform(0, 60, 2).tolist() + rng.uniform(8, 40, 2).tolist()
            cat = int(rng.choice(categories))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(len(anns) == 3)})
            if rng.random() < quality:
                j = rng.normal(0, 6 * (1.2 - quality), 4)
                dets.append({"image_id": i, "category_id": cat, "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                             "score": float(rng.random())})
        for _ in range(rng.integers(0, 3)):
            dets.append({"image_id": i, "category_id": int(rng.choice(categories)),
                         "bbox": rng.uniform(0, 60, 2).tolist() + rng.uniform(5, 30, 2).tolist(),
                         "score": float(rng.random() * 0.8)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, dets


def cocoeval_ap(gt, dets, image_ids):
    """pycocotools' AP, AP50, AP75 (percent) over ``image_ids``."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": 100 * ev.stats[0], "AP50": 100 * ev.stats[1], "AP75": 100 * ev.stats[2]}


def with_copies(gt, dets, counts):
    """The data set in which image i appears counts[i] times (new ids for the copies)."""
    images, anns, new_dets, next_id = [], [], [], 1000
    for img in gt.dataset["images"]:
        for c in range(counts[img["id"]]):
            new_id = img["id"] if c == 0 else next_id + c
            images.append({**img, "id": new_id})
            for a in gt.dataset["annotations"]:
                if a["image_id"] == img["id"]:
                    anns.append({**a, "id": len(anns) + 1, "image_id": new_id})
            new_dets += [{**d, "image_id": new_id} for d in dets if d["image_id"] == img["id"]]
        next_id += 100
    copy = COCO()
    copy.dataset = {"images": images, "annotations": anns, "categories": gt.dataset["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        copy.createIndex()
    return copy, new_dets, [i["id"] for i in images]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_from_matches_equals_cocoeval(seed):
    gt, dets = random_case(seed)
    ids = [i["id"] for i in gt.dataset["images"]]
    ours = ApMatches(match_records(gt, dets, ids)).ap()
    theirs = cocoeval_ap(gt, dets, ids)
    for k in ("AP", "AP50", "AP75"):
        assert abs(ours[k] - theirs[k]) < 1e-9, (k, ours, theirs)


@pytest.mark.parametrize("seed", [3, 4])
def test_weighted_ap_equals_cocoeval_on_copies_of_the_images(seed):
    gt, dets = random_case(seed)
    ids = [i["id"] for i in gt.dataset["images"]]
    counts = {i: int(c) for i, c in zip(ids, np.random.default_rng(seed).integers(0, 3, len(ids)))}
    ours = ApMatches(match_records(gt, dets, ids)).ap(np.array([counts[i] for i in ids], dtype=float))
    copy, copy_dets, copy_ids = with_copies(gt, dets, counts)
    theirs = cocoeval_ap(copy, copy_dets, copy_ids)
    for k in ("AP", "AP50", "AP75"):
        assert abs(ours[k] - theirs[k]) < 1e-6, (k, ours, theirs)


def test_paired_bootstrap_of_two_rows():
    gt, good = random_case(5, quality=0.9)
    _, bad = random_case(5, quality=0.5)
    ids = [i["id"] for i in gt.dataset["images"]]
    a = {s: ApMatches(match_records(gt, good, ids)) for s in (0, 1)}
    b = {s: ApMatches(match_records(gt, bad, ids)) for s in (0, 1)}
    g, lo, hi, n = paired_ap_bootstrap(a, a, replicates=50)
    assert (g, lo, hi, n) == (0.0, 0.0, 0.0, 2)
    g, lo, hi, n = paired_ap_bootstrap(a, b, replicates=200)
    expected = cocoeval_ap(gt, good, ids)["AP"] - cocoeval_ap(gt, bad, ids)["AP"]
    assert abs(g - expected) < 1e-9 and lo <= g <= hi and n == 2
    other = ApMatches(match_records(gt, bad, ids[:-1]))
    with pytest.raises(ValueError, match="different images"):
        paired_ap_bootstrap(a, {0: other})
    with pytest.raises(ValueError, match="no seed"):
        paired_ap_bootstrap(a, {7: other})
