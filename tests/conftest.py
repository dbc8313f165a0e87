"""Test set-up: keep torch to one thread (CI has 2 cores and the subprocess tests run two
processes). The packages come from the installed repository (``pip install -e .[train,test]``,
which requirements.txt does); nothing is put on sys.path by hand."""

import torch

torch.set_num_threads(1)


def pytest_sessionstart(session):
    """Build mabn's C++ kernels (mabn.kernels) once before any test, so that no test or test
    subprocess pays the first build (30-90 s on 2 cores; later processes load the cached build).
    A failed build only warns here; the kernel tests then fail (tests/test_norm.py)."""
    from mabn import kernels
    kernels.load()
