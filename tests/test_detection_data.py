"""mabn.detection.coco (the COCO-format reader) and mabn.detection.synthetic (the builder of the
pasted-photograph instance data set, scripts/make_detection_data.py): on small data made here."""

import importlib.util
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mabn.detection.coco import CocoDetection, DatasetError, collate
from mabn.detection.synthetic import build_detection_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("n001", "n002", "n003")
# pycocotools' mask.decode under numpy 2 (its own code, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ----------------------------------------------------------------------------- the builder

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A photograph folder: 3 classes of smooth random 64x64 JPEGs (one grayscale), 5 train and
    3 val photos each; classes.txt names two of the classes."""
    root = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(123)
    for split, count in (("train", 5), ("val", 3)):
        for c, folder in enumerate(FOLDERS):
            os.makedirs(root / split / folder)
            for i in range(count):
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                photo = Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC)
                if c == 0 and i == 0:
                    photo = photo.convert("L")
                photo.save(root / split / folder / f"{folder}_{i}.JPEG", quality=90)
    (root / "classes.txt").write_text("n001\tgoldfish, Carassius auratus\nn002\tblack stork\n")
    return str(root)


def build(out, source, seed=0, **options):
    """A small build: 10 train and 4 val images of 128 px."""
    return build_detection_dataset(str(out), seed=seed, source=source, train_images=10, val_images=4, **options)


def tree_bytes(root):
    """{relative path: bytes} of every file under ``root``."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    """The data set built once with seed 0 (and its summary)."""
    out = tmp_path_factory.mktemp("built") / "data"
    return str(out), build(out, source)


def test_build_is_deterministic(built, source, tmp_path):
    out, summary = built
    again = build(tmp_path / "again", source)
    files = tree_bytes(out)
    assert {k: v for k, v in again.items() if k not in ("out", "seconds")} == \
        {k: v for k, v in summary.items() if k not in ("out", "seconds")}
    assert sorted(files) == sorted(["annotations/instances_train.json", "annotations/instances_val.json"]
                                   + [f"train/{i:012d}.png" for i in range(1, 11)]
                                   + [f"val/{i:012d}.png" for i in range(1, 5)])
    assert tree_bytes(tmp_path / "again") == files
    other = tree_bytes(build(tmp_path / "other", source, seed=1)["out"])
    assert sorted(other) == sorted(files)
    assert other["annotations/instances_train.json"] != files["annotations/instances_train.json"]
    assert sum(other[name] != files[name] for name in files if name.endswith(".png")) >= 12
    assert not [name for name in os.listdir(tmp_path) if ".tmp." in name]  # no staging folder left


def load_split(out, split):
    """The annotation file of ``split`` as a dict."""
    with open(os.path.join(out, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def photo(source, relative, size=None):
    """A source photograph as RGB uint8, resized (bilinear, as documented) to ``size``."""
    image = Image.open(os.path.join(source, relative)).convert("RGB")
    return np.asarray(image if size is None else image.resize(tuple(size), Image.Resampling.BILINEAR))


def test_masks_are_the_pasted_pixels(built, source):
    out, _ = built
    for split in ("train", "val"):
        data = load_split(out, split)
        for entry in data["images"]:
            image = np.asarray(Image.open(os.path.join(out, split, entry["file_name"])))
            assert image.shape == (entry["height"], entry["width"], 3) == (128, 128, 3)
            covered = np.zeros(image.shape[:2], np.int64)
            for ann in (a for a in data["annotations"] if a["image_id"] == entry["id"]):
                mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                ys, xs = np.nonzero(mask)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
                src = ann["source"]
                assert src["photo"].startswith(split + os.sep)  # val objects from val photographs
                (x, y), (w, h) = src["offset"], src["size"]
                outside = mask.copy()
                outside[y:y + h, x:x + w] = False
                assert not outside.any()  # the mask lies in the pasted rectangle
                pasted = photo(source, src["photo"], (w, h))
                window = mask[y:y + h, x:x + w]
                np.testing.assert_array_equal(image[y:y + h, x:x + w][window], pasted[window])
                covered += mask
            assert covered.max() <= 1  # the visible masks do not overlap
            tiles = [photo(source, tile) for tile in entry["source"]["background"]]
            background = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
            np.testing.assert_array_equal(image[covered == 0], background[covered == 0])


def test_coco_header_and_counts(built):
    out, summary = built
    train = load_split(out, "train")
    assert set(train) >= {"info", "licenses", "images", "annotations", "categories"}
    assert [(c["id"], c["name"]) for c in train["categories"]] == [(1, "goldfish, Carassius auratus"),
                                                                    (2, "black stork"), (3, "n003")]
    assert summary["categories"] == 3
    assert summary["train"] == {"images": 10, "objects": len(train["annotations"]),
                                "empty_images": sum(not any(a["image_id"] == i["id"] for a in train["annotations"])
                                                    for i in train["images"])}
    per_image = np.bincount([a["image_id"] for a in train["annotations"]], minlength=11)[1:]
    assert per_image.max() <= 4 and len(train["annotations"]) >= 10
    assert [a["id"] for a in train["annotations"]] == list(range(1, len(train["annotations"]) + 1))


def test_loader_reads_the_built_data(built):
    out, _ = built
    dataset = CocoDetection(out, "val")
    assert len(dataset) == 4 and dataset.num_classes == 4
    assert dataset.label_to_category_id == {1: 1, 2: 2, 3: 3}
    data = load_split(out, "val")
    for i, image_id in enumerate(dataset.image_ids):
        image, target = dataset[i]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32 and target["image_id"] == image_id
        anns = [a for a in data["annotations"] if a["image_id"] == image_id]
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["boxes"].tolist() == [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["masks"].shape == (len(anns), 128, 128) and target["masks"].dtype == torch.uint8
        assert target["masks"].sum((1, 2)).tolist() == [a["area"] for a in anns]


def test_build_without_objects_and_refusals(source, tmp_path):
    summary = build_detection_dataset(str(tmp_path / "empty"), source=source, train_images=2, val_images=1,
                                      empty_fraction=1.0)
    assert summary["train"] == {"images": 2, "objects": 0, "empty_images": 2}
    image, target = CocoDetection(str(tmp_path / "empty"), "train")[0]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 128, 128)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="full"):
        build(tmp_path / "full", source)
    with pytest.raises(DatasetError, match="nowhere"):
        build(tmp_path / "new", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="max_object_size"):
        build(tmp_path / "new", source, max_object_size=200)


def test_script_builds_and_reports_errors_in_one_line(source, tmp_path, capsys):
    path = os.path.join(REPO, "scripts", "make_detection_data.py")
    spec = importlib.util.spec_from_file_location("make_detection_data", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "d"), "--seed", "3", "--source", source, "--train-images", "2",
                        "--val-images", "1", "--image-size", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["images"] == 2
    assert Image.open(tmp_path / "d" / "val" / "000000000001.png").size == (64, 64)
    non_empty_out = [str(tmp_path / "d"), "--source", source]
    missing_source = [str(tmp_path / "e"), "--source", str(tmp_path / "none")]
    for argv in (non_empty_out, missing_source):
        assert script.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path / "e"), "--seed", "x"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# ----------------------------------------------------------------------------- the reader

def write_coco(root, images, annotations, categories=((1, "a"),), split="train", extra=None):
    """Write a hand-made COCO data set under ``root``: ``images`` are (id, width, height), each
    image a random PNG ``<id>.png``."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for image_id, width, height in images:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, f"{image_id}.png"))
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in images],
            "annotations": annotations, "categories": [{"id": c, "name": n} for c, n in categories]}
    data.update(extra or {})
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)
    return str(root)


def ann(ann_id, image_id, bbox, segmentation=None, category_id=1, iscrowd=0):
    """An annotation with a box xywh (its segmentation the box polygon unless given)."""
    x, y, w, h = bbox
    segmentation = segmentation or [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "area": w * h, "iscrowd": iscrowd, "segmentation": segmentation}


def uncompressed_rle(mask):
    """COCO's uncompressed RLE written out: run lengths of the column-major pixels, zeros first."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def test_polygon_and_rle_masks(tmp_path):
    blob = np.zeros((30, 40), np.uint8)
    blob[5:20, 8:30] = 1
    blob[10:25, 20:26] = 1  # not a box
    compressed = mask_utils.encode(np.asfortranarray(blob))
    compressed["counts"] = compressed["counts"].decode()
    polygon = [[2.0, 2.0, 12.0, 2.0, 2.0, 12.0]]  # a triangle
    root = write_coco(tmp_path, [(1, 40, 30)], [ann(1, 1, (2, 2, 10, 10), polygon),
                                               ann(2, 1, (8, 5, 22, 20), compressed),
                                               ann(3, 1, (8, 5, 22, 20), uncompressed_rle(blob))])
    dataset = CocoDetection(root, "train")
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and 0 <= image.min() and image.max() <= 1
    masks = target["masks"].numpy()
    expected_polygon = mask_utils.decode(mask_utils.frPyObjects(polygon, 30, 40))[:, :, 0]
    np.testing.assert_array_equal(masks[0], expected_polygon)
    assert masks[0][4, 4] == 1 and masks[0][11, 11] == 0  # inside / beyond the hypotenuse
    np.testing.assert_array_equal(masks[1], blob)
    np.testing.assert_array_equal(masks[2], blob)
    assert target["boxes"].tolist()[1] == [8, 5, 30, 25] and target["labels"].tolist() == [1, 1, 1]
    assert target["area"].dtype == torch.float32 and target["iscrowd"].tolist() == [0, 0, 0]
    no_masks = CocoDetection(root, "train", masks=False)[0][1]
    assert "masks" not in no_masks and no_masks["boxes"].shape == (3, 4)


def test_crowd_empty_degenerate_and_category_ids(tmp_path, caplog):
    annotations = [ann(1, 1, (0, 0, 10, 10), category_id=90), ann(2, 1, (5, 5, 20, 20), category_id=3),
                   ann(3, 1, (1, 1, 30, 30), uncompressed_rle(np.ones((32, 32), np.uint8)),
                       category_id=7, iscrowd=1),
                   ann(4, 3, (4, 4, 0, 10), category_id=7), ann(5, 3, (4, 4, 6, 6), category_id=7)]
    root = write_coco(tmp_path, [(1, 32, 32), (2, 32, 32), (3, 32, 32)], annotations,
                      categories=((90, "z"), (3, "x"), (7, "y")))
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(root, "train")
    warnings = [r.getMessage() for r in caplog.records if "degenerate" in r.getMessage()]
    assert len(warnings) == 1 and "1 annotation" in warnings[0] and "instances_train.json" in warnings[0]
    assert dataset.skipped["degenerate_boxes"] == 1
    assert dataset.num_classes == 4 and dataset.label_to_category_id == {1: 3, 2: 7, 3: 90}
    assert [c["id"] for c in dataset.categories] == [3, 7, 90]
    assert dataset.image_ids == [1, 2, 3]
    first, empty, third = (dataset[i][1] for i in range(3))
    assert first["labels"].tolist() == [3, 1]  # the crowd annotation is not a target ...
    assert 3 in dataset.coco.anns and dataset.coco.anns[3]["iscrowd"] == 1  # ... but is in coco
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 32, 32)
    assert third["labels"].tolist() == [2] and third["boxes"].tolist() == [[4, 4, 10, 10]]
    dropped = CocoDetection(root, "train", drop_empty=True)
    assert dropped.image_ids == [1, 3] and dropped.skipped["empty_images"] == 1


def test_horizontal_flip_follows_torch_global_generator(tmp_path):
    root = write_coco(tmp_path, [(1, 40, 30)], [ann(1, 1, (2, 3, 10, 20)), ann(2, 1, (25, 0, 15, 5))])
    image, target = CocoDetection(root, "train")[0]
    flipping = CocoDetection(root, "train", train=True, hflip=0.5)
    outcomes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        flip = float(torch.rand(())) < 0.5
        torch.manual_seed(seed)
        got_image, got = flipping[0]
        outcomes.add(flip)
        if flip:
            assert torch.equal(got_image, image.flip(-1)) and torch.equal(got["masks"], target["masks"].flip(-1))
            assert got["boxes"].tolist() == [[40 - 12, 3, 40 - 2, 23], [0, 0, 15, 5]]
        else:
            assert torch.equal(got_image, image) and torch.equal(got["masks"], target["masks"])
            assert torch.equal(got["boxes"], target["boxes"])
        # the flipped box is the tight box of the flipped mask
        ys, xs = torch.nonzero(got["masks"][1], as_tuple=True)
        tight = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        assert tight == got["boxes"][1].tolist()
    assert outcomes == {True, False}
    images, targets = collate([flipping[0], flipping[0]])
    assert len(images) == len(targets) == 2 and isinstance(targets[0], dict)


def test_unreadable_image_is_replaced_by_the_next(tmp_path, caplog):
    root = write_coco(tmp_path, [(1, 16, 16), (2, 16, 16), (3, 16, 16), (4, 16, 16)],
                      [ann(i, i, (1, 1, 5, 5)) for i in range(1, 5)])
    (tmp_path / "train" / "2.png").write_bytes(b"not a png at all")
    os.remove(tmp_path / "train" / "4.png")
    dataset = CocoDetection(root, "train", cache=True)
    with caplog.at_level(logging.WARNING):
        assert dataset[1][1]["image_id"] == 3
        assert dataset[3][1]["image_id"] == 1  # wraps around
        assert dataset[1][1]["image_id"] == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "2.png" in messages[0] and "4.png" in messages[1]
    assert dataset.skipped["unreadable_images"] == 2


def test_dataset_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(DatasetError, match="instances_train.json.*not found"):
        CocoDetection(str(tmp_path / "none"), "train")
    root = write_coco(tmp_path / "bad_json", [(1, 8, 8)], [])
    with open(os.path.join(root, "annotations", "instances_train.json"), "w") as f:
        f.write('{"images": [}\n')
    with pytest.raises(DatasetError, match=r"instances_train.json: malformed JSON at line 1 column 13"):
        CocoDetection(root, "train")
    root = write_coco(tmp_path / "no_key", [(1, 8, 8)], [])
    with open(os.path.join(root, "annotations", "instances_train.json"), "w") as f:
        json.dump({"images": [], "annotations": []}, f)
    with pytest.raises(DatasetError, match="'categories' is missing"):
        CocoDetection(root, "train")
    root = write_coco(tmp_path / "bad_cat", [(1, 8, 8)], [ann(17, 1, (1, 1, 2, 2), category_id=5)])
    with pytest.raises(DatasetError, match="instances_train.json: annotation 17 has category_id 5"):
        CocoDetection(root, "train")
    root = write_coco(tmp_path / "bad_image", [(1, 8, 8)], [ann(4, 9, (1, 1, 2, 2))])
    with pytest.raises(DatasetError, match="annotation 4 has image_id 9"):
        CocoDetection(root, "train")
    root = write_coco(tmp_path / "no_folder", [(1, 8, 8)], [])
    os.remove(os.path.join(root, "train", "1.png"))
    os.rmdir(os.path.join(root, "train"))
    with pytest.raises(DatasetError, match="image folder .*no_folder.train not found"):
        CocoDetection(root, "train")
