"""The repository is an installable package: the library needs only torch, a wheel holds the
library and not the trainer's scripts, and nothing puts the repository on sys.path by hand."""

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from mabn import kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ONLY = ("torchvision", "hydra", "omegaconf", "yaml", "matplotlib", "tensorboard", "tqdm", "onnx",
              "onnxruntime", "submitit")


def test_library_imports_and_works_without_the_train_extra():
    """A fresh interpreter in which every package of the train/test extras fails to import."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAIN_ONLY!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch, mabn
model = torch.nn.Sequential(mabn.CenConv2d(3, 4, 3), mabn.MABN2d(4, norm_batch_size=2))
model(torch.randn(4, 3, 6, 6)).sum().backward()
model.eval()
x = torch.randn(2, 3, 6, 6)
assert (mabn.fold_model(model)(x) - model(x)).abs().max() < 1e-5
assert not [m for m in sys.modules if m.split(".")[0] in {TRAIN_ONLY!r}], "a train-only package was imported"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_no_sys_path_edits():
    offenders = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("results", "runs", "build")]
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and path != os.path.abspath(__file__):
                text = open(path, encoding="utf-8").read()
                if re.search(r"sys\.path\.(insert|append)|PYTHONPATH", text):
                    offenders.append(os.path.relpath(path, REPO))
    assert offenders == []


def test_requirements_install_the_repository_with_its_extras():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines == ["-e .[train,test]"]


def test_wheel_holds_the_library_and_requires_only_torch_and_ninja(tmp_path):
    """Build a wheel from a copy of the repository (no network: the installed setuptools): the
    library with the C++ source its CPU kernels are built from, needing torch and ninja only."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in os.listdir(REPO):
        if name.startswith(".") or name in ("results", "runs", "build", "dist") or name.endswith(".egg-info"):
            continue
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mabn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    csrc = {f"mabn/csrc/{name}" for name in kernels.SOURCES + kernels.HEADERS}  # what the build reads
    assert csrc == {f"mabn/csrc/{name}" for name in os.listdir(os.path.join(REPO, "mabn", "csrc"))}
    assert csrc | {"mabn/__init__.py", "mabn/norm.py", "mabn/functional.py", "mabn/options.py",
                   "mabn/backends/__init__.py", "mabn/backends/cpp.py", "mabn/kernels.py",
                   "mabn/fold/__init__.py", "mabn/engine/trainer.py", "mabn/lab/studies.py"} <= set(names)
    assert all(n.startswith(("mabn/", "mabn-")) for n in names), names  # no scripts, tests, configs
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(meta_name))
    requires = meta.get_all("Requires-Dist")
    assert [r for r in requires if "extra ==" not in r] == ["torch>=2.4", "ninja>=1.10"]
    assert not any("==" in r.split(";")[0] for r in requires)  # ranges, never pins
    extras = {r.split(";")[0].split(">")[0].split("<")[0].strip().lower(): r.split("extra ==")[1].strip(" '\"")
              for r in requires if "extra ==" in r}
    for pkg in ("torchvision", "hydra-core", "omegaconf", "tensorboard", "tqdm", "matplotlib", "pyyaml"):
        assert extras.get(pkg) == "train", (pkg, extras)
    for pkg in ("pytest", "onnx", "onnxruntime"):
        assert extras.get(pkg) == "test", (pkg, extras)
