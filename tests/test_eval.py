"""eval.py reproduces the validation error that training logged, on a real ImageFolder."""

import json
import os

from _train_utils import PYTHON, make_image_folder, metrics, run_script, tiny, train_in_process


def test_eval_reproduces_training_error(tmp_path, caplog):
    root = make_image_folder(tmp_path / "images")
    with open(os.path.join(root, "train", "class0", "broken.png"), "wb") as f:
        f.write(b"this is not a PNG")  # logged and replaced by the next image, not a crash
    out = tmp_path / "run"
    overrides = tiny(out, iterations=6, **{"data": "imagefolder", "data.root": root, "data.image_size": 16,
                                          "data.batch_size": 4, "data.eval_batch_size": 5})
    m = train_in_process(overrides)
    assert m["status"] == "finished" and m["val_top1_err"] is not None
    assert "unreadable image" in caplog.text and "broken.png" in caplog.text

    ckpt = out / "checkpoints" / "ckpt_0000006.pt"
    # A run directory resolves to its newest checkpoint; a different eval batch changes nothing.
    r = run_script([PYTHON, "eval.py", str(out), "data.eval_batch_size=3", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "checkpoints" / "ckpt_0000006.eval.json") as f:
        result = json.load(f)
    assert result["checkpoint"] == str(ckpt.resolve()) and result["samples"] == 12
    assert result["top1_err"] == metrics(out)["val_top1_err"]
    assert result["top5_err"] == metrics(out)["val_top5_err"]
    assert json.loads(r.stdout)["top1_err"] == result["top1_err"]


def test_eval_rejects_a_corrupted_checkpoint(tmp_path):
    bad = tmp_path / "ckpt_0000001.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run_script([PYTHON, "eval.py", str(bad)])
    assert r.returncode == 2 and "is corrupted or not a checkpoint" in r.stderr


def test_eval_under_torchrun_matches_single_process(tmp_path):
    out = tmp_path / "run"
    m = train_in_process(tiny(out, iterations=2, **{"data.val_size": 25}))  # 25: uneven shards
    r = run_script([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "eval.py", str(out / "checkpoints" / "ckpt_0000002.pt")])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "checkpoints" / "ckpt_0000002.eval.json") as f:
        result = json.load(f)
    assert result["world_size"] == 2 and result["samples"] == 25
    assert result["top1_err"] == m["val_top1_err"]
