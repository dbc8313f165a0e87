"""torch.compile for the trainer (compile=true) and the benchmarks: whether it can run on this
machine, how it is called, and where it is known to compute wrong results.

* :func:`unavailable_reason`: torch.compile's default backend (inductor) generates code at run
  time: C++ built by the system's C++ compiler for the CPU (``$CXX``, else ``g++``; torch's own
  search, ``torch._inductor.cpp_builder.get_cpp_compiler``), Triton kernels for CUDA. Without
  them the failure comes deep inside the first forward pass as a long compiler traceback; this
  finds it out beforehand, so that a run stops at once with a message naming ``compile``.
* :func:`compile_module`: ``torch.compile`` with :data:`INDUCTOR_OPTIONS` (which avoid one
  miscompilation of the mabn layers).
* :func:`miscompiled_reason`: normalizations that compiled models still get wrong; the trainer
  refuses to compile them.

Both miscompilations were found by comparing the gradients of compiled and eager ResNets of mabn
layers iteration by iteration (eager float32 agrees with float64 to 1e-6 there).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys

import torch

from mabn.backends import BACKENDS

__all__ = ["unavailable_reason", "miscompiled_reason", "compile_module", "INDUCTOR_OPTIONS"]


def _cpp_compiler() -> str | None:
    """The C++ compiler inductor would use for the CPU, or None when it finds none."""
    try:
        from torch._inductor import cpp_builder
        return cpp_builder.get_cpp_compiler()
    except ImportError:  # a private module moved: do its search by hand
        pass
    except Exception:  # torch._inductor.exc.InvalidCxxCompiler: no working compiler
        return None
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return None
    try:
        subprocess.run([cxx, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return cxx


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
        return bool(has_triton())
    except ImportError:
        return importlib.util.find_spec("triton") is not None


def unavailable_reason(device_type: str) -> str | None:
    """None when torch.compile (inductor) can compile for ``device_type`` ("cpu" or "cuda") here;
    otherwise one line saying what is missing."""
    dynamo_supported = getattr(torch._dynamo, "is_dynamo_supported", lambda: True)
    if not dynamo_supported():
        return f"torch {torch.__version__} does not support torch.compile on Python {sys.version.split()[0]}"
    if device_type == "cpu":
        if _cpp_compiler() is None:
            cxx = os.environ.get("CXX", "g++")
            return (f"its CPU backend (inductor) needs a C++ compiler and none works here ({cxx!r} "
                    f"not found or failing; set CXX or install g++)")
        return None
    if device_type == "cuda":
        if not _has_triton():
            return ("its CUDA backend (inductor) needs Triton, which is not installed or does not "
                    "support this GPU (pip install triton; compute capability 7.0 or newer)")
        return None
    return f"device type {device_type!r} is not supported by this check (cpu or cuda)"


#: Inductor options of :func:`compile_module`. ``inplace_buffers=False``: with in-place buffer
#: reuse, inductor (torch 2.14, CPU) stores the renormalization factor r of a BatchStatNorm2d
#: with fp_stats != bp_stats = "sma" into the buffer that still holds the new rows of the SMA
#: window (``torch.cat([window, batch])`` in ``mabn.functional.sliding_mean``) while later groups
#: read them, so the SMA, 1/sigma and the backward pass come out wrong (15-30% relative error of
#: the input gradient). Without the reuse the compiled layer matches eager to float32 rounding.
INDUCTOR_OPTIONS = {"inplace_buffers": False}


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(module, dynamic=False)`` (inductor, with :data:`INDUCTOR_OPTIONS`) as the
    trainer and the benchmarks use it. The wrapper computes with ``module``'s own parameters and
    buffers; its state_dict keys carry an ``_orig_mod.`` prefix, so save ``module``'s.

    ``dynamic=False``: every shape and Python number is specialized (the training batches have
    one shape). With torch's default, a second compilation of a BatchStatNorm2d whose ``alpha``
    differs (e.g. one layer of each preset, as scripts/bench_norm.py compiles them) turns alpha
    into a graph input and dynamo fails with an internal error ("Argument 'item' of Node ...
    does not belong to this Graph"; torch 2.14)."""
    return torch.compile(module, dynamic=False, options=dict(INDUCTOR_OPTIONS))


def _family_sums_use_vector_norm() -> bool:
    """Whether the graph torch.compile captures from the per-sample sums of squares that every
    compiled BatchStatNorm2d computes (``sample_sums`` of the "torch" backend,
    :class:`mabn.backends.base.Passes`) calls torch.linalg.vector_norm."""
    return _captures_vector_norm(BACKENDS["torch"].sample_sums)


@functools.lru_cache(maxsize=None)
def _captures_vector_norm(fn) -> bool:
    """Trace ``fn`` on small NCHW and channels_last inputs with dynamo into a backend that only
    records the graph (no code generation, about a second) and look for vector_norm in it. Cached
    per function: dynamo would not call the backend again for a function it has compiled."""
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    traced = torch.compile(lambda x: fn(x), backend=record, dynamic=False)
    for fmt in (torch.contiguous_format, torch.channels_last):
        traced(torch.ones(2, 3, 4, 4).contiguous(memory_format=fmt))
    return any("vector_norm" in t for t in targets)


def miscompiled_reason(norm_layer: str) -> str | None:
    """None unless torch.compile is known to compute wrong results for a model whose
    normalizations are ``norm_layer`` (the trainer's norm.layer); then why, in one line.

    Known: when the compiled graph takes the per-sample sums of squares of the layers as
    ``torch.linalg.vector_norm(x).square()``, the compiled forward+backward of a ResNet of mabn
    family layers (layer="batchstat") gives input and parameter gradients off by 1-2% (relative) on
    some iterations while the loss and every buffer agree (torch 2.14.1, CPU). torch's compiler
    bisector points at the decomposition of aten.linalg_vector_norm (backend
    aot_eager_decomp_partition fails, aot_eager does not); ``(x * x).sum(-1)`` (what the "torch"
    backend computes under torch.compile since this was found) makes the compiled gradients match eager
    to 1e-6. Checked on the graph dynamo captures, so the refusal holds exactly while the
    compiled graph still calls vector_norm.
    """
    if norm_layer == "batchstat" and _family_sums_use_vector_norm():
        return ("torch.compile computes wrong gradients (1-2% off) for the mabn family layers while the "
                "compiled per-sample sums of squares call torch.linalg.vector_norm (its decomposition is "
                "miscompiled; see mabn/engine/compiling.py)")
    return None
