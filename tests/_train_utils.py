"""Helpers of the trainer tests: config composition, tiny runs, subprocess runs, tiny ImageFolders."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from hydra import compose, initialize_config_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
PYTHON = sys.executable


def _load_entry_point(name: str):
    """Import the top-level script ``<name>.py`` of the repository as a module (its ``main`` does
    not run), without putting the repository on sys.path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def compose_cfg(overrides=()):
    """The composed (not yet validated) Hydra config, as train_imagenet.py sees it."""
    _load_entry_point("train_imagenet")  # registers the schema "mabn_schema"
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def load_cfg(overrides=()):
    from mabn.engine import config
    return config.load(compose_cfg(overrides))


def tiny(out_dir, iterations=6, **extra) -> list[str]:
    """Overrides for a run of seconds: small-input ResNet-18, 16 px synthetic images, batch 8 in
    normalization groups of 2 (MABN, so the SMA windows are exercised), CPU, one log line per
    iteration."""
    o = {
        "norm": "mabn", "model": "resnet18_small", "data": "synthetic", "device": "cpu",
        "data.batch_size": 8, "norm.norm_batch_size": 2, "norm.buffer_size": 4,
        "norm.renorm_warmup_iters": 2, "data.image_size": 16, "data.train_size": 48,
        "data.val_size": 24, "data.workers": 0, "schedule.iterations": iterations,
        "schedule.milestones": "[]", "schedule.log_every": 1, "schedule.eval_every": 0,
        "schedule.ckpt_every": 100, "optim.lr": 0.02, "progress_bar": "false", "out_dir": str(out_dir),
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def train_in_process(overrides) -> dict:
    from mabn.engine import trainer
    return trainer.train(load_cfg(overrides))


def run_script(args, timeout=900, env=None, **kw) -> subprocess.CompletedProcess:
    """Run a script of the repository (mabn comes from the installed repository); the timeout is
    a wide margin for a loaded machine (the tests size their work to take seconds to a minute on
    an idle one)."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run(args, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout, **kw)


def snapshot(folder, exclude=()) -> dict:
    """{relative path: (size, mtime_ns)} of every file under ``folder`` (to show nothing changed)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, folder)
            if rel not in exclude:
                st = os.stat(p)
                out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def read_log(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def metrics(out_dir) -> dict:
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


def make_image_folder(root, classes=3, train_per_class=8, val_per_class=4, size=20) -> str:
    """A tiny ImageFolder (train/, val/) of PNGs whose colour depends on the class."""
    import random

    from PIL import Image
    rng = random.Random(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                base = [40 + 80 * c if k == c % 3 else 60 for k in range(3)]
                img = Image.new("RGB", (size, size))
                img.putdata([tuple(min(255, max(0, b + rng.randint(-30, 30))) for b in base)
                             for _ in range(size * size)])
                img.save(os.path.join(d, f"{i}.png"))
    return str(root)
