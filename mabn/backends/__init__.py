"""The backends of a training step, and the one function that chooses among them.

A backend runs :class:`mabn.BatchStatNorm2d`'s training forward (and, through autograd, its
eq. 20 backward) with ``train_forward(layer, x, groups)``. Four are registered in
:data:`BACKENDS`:

* ``"torch"`` (:class:`~mabn.backends.base.Passes`): :mod:`mabn.functional` with plain torch
  expressions for every pass; CUDA and torch.compile;
* ``"cpu"`` (:class:`~mabn.backends.cpu.CpuPasses`): the same math with views onto torch's fast
  CPU kernels; eager CPU without mabn's C++ kernels (float64, half precision is computed in
  float32 and takes the float32 rules; or the kernels off / not built);
* ``"cpp_passes"`` (:class:`~mabn.backends.cpp.CppPasses`): the same math with a C++ loop per
  pass; float32 inputs whose layer tensors the C++ layer does not take;
* ``"cpp_layer"`` (:class:`~mabn.backends.cpp.CppLayer`): the whole step in C++.

All give the same results up to float32 summation order; ``tests/test_norm.py`` holds each to
float64 references and to the others. A new backend (CUDA, Triton) is a module here and one rule
in :func:`choose`.
"""

from __future__ import annotations

import contextlib

import torch

from .. import kernels
from .base import Passes
from .cpp import CppLayer, CppPasses
from .cpu import CpuPasses

__all__ = ["BACKENDS", "choose", "forced"]

#: The backends by name.
BACKENDS = {b.name: b for b in (Passes(), CpuPasses(), CppPasses(), CppLayer())}

_forced_name = None


def choose(layer, x):
    """The backend of one training forward of ``layer`` on ``x`` (already in its compute dtype).

    The rule, in order:

    1. inside :func:`forced`, the forced backend;
    2. ``"torch"`` off the CPU (CUDA, ...) and under torch.compile;
    3. ``"cpu"`` for tensors other than float32, or where mabn's C++ kernels are off
       (``mabn.kernels.MODE``) or could not be built (:func:`mabn.kernels.load` builds them on
       first use);
    4. ``"cpp_layer"`` where it applies (:meth:`CppLayer.applies`: x contiguous or channels_last,
       the layer's parameters and buffers contiguous float32 tensors);
    5. ``"cpp_passes"`` otherwise.
    """
    if _forced_name is not None:
        return BACKENDS[_forced_name]
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return BACKENDS["torch"]
    if x.dtype != torch.float32 or kernels.load() is None:
        return BACKENDS["cpu"]
    if CppLayer.applies(layer, x):
        return BACKENDS["cpp_layer"]
    return BACKENDS["cpp_passes"]


@contextlib.contextmanager
def forced(name: str | None):
    """Within the block every training forward uses backend ``name`` (None: the rule of
    :func:`choose`); for tests and benchmarks that compare backends. Not thread-safe."""
    global _forced_name
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {list(BACKENDS)}")
    saved, _forced_name = _forced_name, name
    try:
        yield
    finally:
        _forced_name = saved
