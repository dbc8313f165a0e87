"""CPU kernels of the eager normalization layers: one pass where eager torch needs several.

:mod:`mabn.norm` builds its layers from torch operations. Three of its memory-bound steps have
no single eager torch kernel, and on the CPU they are what separates the layer from
nn.BatchNorm2d's fused C++ kernels (``results/bench_norm.md``):

* the per-(group, channel) sums of a channels_last tensor (eq. 2/15 forward, eq. 20 backward
  reductions): a sample's channels cannot share one channel axis with other samples' in that
  layout, so torch's per-channel kernels take one call per normalization group;
* the per-(sample, channel) sums of a contiguous tensor (the same, per H*W plane);
* eq. 20's input gradient ``dout * a + x * b + c`` with per-(sample, channel) coefficients,
  which eager torch writes in two passes (the second reading and rewriting the first's output).

``mabn/csrc/norm_kernels.cpp`` writes each as one loop over its inputs (float32; sums
accumulated in float32 blocks added in float64). ``mabn/csrc/norm_statistics.cpp``, in the same
extension, computes the statistics between those passes (mabn.norm._forward_statistics and
_backward_statistics: SMA windows, EMAs, renormalization, eq. 20's coefficients) as loops over
(group, channel) values, and ``mabn/csrc/norm_layer.cpp`` strings the passes and the statistics
together into a layer's whole training forward and backward (mabn.norm._NativeNormalize), one
call each, where the Python path dispatches ~100 small operations and autograd nodes per layer
and iteration (a fixed ~0.5 ms per call that, at 7x7 maps, cost as much as the passes over the
data). The extension is compiled with torch's C++ extension
builder the first time a layer needs it (about 30-60 s on 2 cores; the build is cached under
torch's extension directory, ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, and later
processes load it in well under a second). Where it cannot be built (no C++ compiler or ninja)
the layers warn once and keep their torch-operation paths, which give the same results.

The two writing kernels store an output of at least ``STREAM_BYTES`` (default 4 MiB; the
environment variable ``MABN_STREAM_BYTES`` sets it at import, 0 streams every output) with
non-temporal (streaming) stores where its rows are whole 64-byte cache lines (channels_last
rows of C floats, contiguous planes of H*W floats with H*W a multiple of 16; rows sharing a line
would mix streaming and ordinary stores in it, which was 9x slower on an AMD Zen 3 at 7x7
maps): it goes to memory without first being read into the cache,
which saves a third of a pass's memory traffic, but the next layer must read it back from memory
rather than from the last-level cache. Measured on an AMD EPYC (Zen 5, 32 MiB L3): 4 MiB against
32 MiB (the L3's size) made MABN2d 5-25% faster at 14x14 and 7x7 maps in isolation and made no
measurable difference to a ResNet-50 training step (``results/speed.md``).

``mabn.kernels.MODE``: ``"auto"`` (the default; the environment variable ``MABN_CPU_KERNELS``
sets it at import) uses the kernels for float32 CPU tensors in eager mode; ``"off"`` never
builds nor uses them. Under torch.compile and on CUDA the layers never use them.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from .options import OptionError

__all__ = ["MODE", "MODES", "STREAM_BYTES", "load", "status", "enabled", "stream"]

MODES = ("auto", "off")
#: "auto" or "off"; see the module docstring.
MODE = os.environ.get("MABN_CPU_KERNELS", "auto")



def _stream_bytes_from_env() -> int:
    value = os.environ.get("MABN_STREAM_BYTES")
    if value is None:
        return 4 << 20
    if not value.isdigit():  # (a ValueError like mabn.norm.OptionError's: this runs at import)
        raise ValueError(f"MABN_STREAM_BYTES (environment variable)={value!r} is a whole number of bytes >= 0")
    return int(value)


#: Outputs of at least this many bytes are written with streaming stores; see the module docstring.
STREAM_BYTES = _stream_bytes_from_env()

_SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", name)
            for name in ("norm_kernels.cpp", "norm_statistics.cpp", "norm_layer.cpp")]
_NAME = "mabn_norm_kernels_v9"  # change with the source's interface
_module = None  # the loaded extension; False once building failed
_lock = threading.Lock()


def _check_mode() -> None:
    if MODE not in MODES:
        raise OptionError("mabn.kernels.MODE (environment variable MABN_CPU_KERNELS)", MODE,
                          'is "auto" or "off"')


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; the ninja package (a dependency of
    mabn) installs it into the environment's bin directory, which is not on PATH when a virtual
    environment's python is run without activating it."""
    import shutil
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load():
    """The compiled extension (building it on first use), or None when MODE is "off" or it could
    not be built (warned once)."""
    global _module
    _check_mode()
    if MODE == "off" or _module is False:
        return None
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                _ninja_on_path()
                from torch.utils import cpp_extension
                with warnings.catch_warnings():  # "no CUDA runtime" notes of a CUDA build of torch
                    warnings.simplefilter("ignore")
                    _module = cpp_extension.load(
                        name=_NAME, sources=_SOURCES, extra_cflags=["-O3", "-fno-math-errno", "-fopenmp"],
                        extra_ldflags=["-fopenmp"], with_cuda=False, verbose=False)
            except Exception as error:  # no compiler, no ninja, a failed build
                _module = False
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                warnings.warn(f"mabn.kernels: the CPU kernels could not be built ({type(error).__name__}: {first}); "
                              f"the layers use torch operations instead (same results, slower on the CPU; "
                              f"set MABN_CPU_KERNELS=off to skip the attempt)", RuntimeWarning)
    return _module or None


def enabled(*tensors: torch.Tensor):
    """The extension if the kernels apply to these tensors (float32, CPU, eager mode, MODE "auto"
    and built), else None."""
    if MODE == "off" or _module is False:
        return None
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    if torch.compiler.is_compiling():
        return None
    return load()


def stream(out: torch.Tensor) -> bool:
    """Whether a kernel writes ``out`` with streaming stores (its size >= STREAM_BYTES)."""
    return out.numel() * out.element_size() >= STREAM_BYTES


def status() -> str:
    """One line for benchmark reports: which path eager CPU layers take."""
    if MODE == "off":
        return "torch operations (MABN_CPU_KERNELS / mabn.kernels.MODE off)"
    if _module is False:
        return "torch operations (mabn.kernels auto, but the kernels failed to build)"
    if _module is None:
        return "mabn.kernels auto, not built yet in this process"
    return "mabn's C++ kernels (mabn.kernels auto, built)"
