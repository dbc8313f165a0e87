"""mabn's C++ extension (``mabn/csrc``): building, loading, and the switches of its kernels.

The extension holds the memory-bound passes of the eager CPU layers as one loop each
(``norm_kernels.cpp``: per-(group, channel) sums, the output, eq. 20's input gradient), the C++
twins of :mod:`mabn.functional`'s statistics (``norm_statistics.cpp``) and a layer's whole
training forward and backward (``norm_layer.cpp``); ``bindings.cpp`` is its Python module and
``norm_types.h`` the structs its entry points take. :mod:`mabn.backends.cpp` uses it.

It is compiled with torch's C++ extension builder the first time a layer needs it (about 30-60 s
on 2 cores) into a folder named by a hash of the sources' content, the compiler flags and the
torch and Python versions, under ``TORCH_EXTENSIONS_DIR`` (or ``~/.cache/torch_extensions``):
every checkout and install of the same code shares one build, and changed code builds anew
without touching the others'. A later process loads the built library directly (well under a
second). Where it cannot be built (no C++ compiler or ninja) the layers warn once and keep
torch's operations (the "cpu" backend), which give the same results.

The two writing kernels store an output of at least ``STREAM_BYTES`` (default 4 MiB; the
environment variable ``MABN_STREAM_BYTES`` sets it at import, 0 streams every output) with
non-temporal (streaming) stores where its rows are whole 64-byte cache lines (channels_last
rows of C floats, contiguous planes of H*W floats with H*W a multiple of 16; rows sharing a line
would mix streaming and ordinary stores in it, which was 9x slower on an AMD Zen 3 at 7x7
maps): it goes to memory without first being read into the cache, which saves a third of a
pass's memory traffic, but the next layer must read it back from memory rather than from the
last-level cache (measurements in ``results/speed.md``).

``mabn.kernels.MODE``: ``"auto"`` (the default; the environment variable ``MABN_CPU_KERNELS``
sets it at import) uses the kernels for float32 CPU tensors in eager mode; ``"off"`` never
builds nor uses them. Under torch.compile and on CUDA the layers never use them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import warnings

import torch

from .options import OptionError

__all__ = ["MODE", "MODES", "STREAM_BYTES", "load", "status", "stream", "stream_bytes_from_env",
           "build_key", "build_directory"]

MODES = ("auto", "off")
#: "auto" or "off"; see the module docstring.
MODE = os.environ.get("MABN_CPU_KERNELS", "auto")


def stream_bytes_from_env() -> int:
    """``MABN_STREAM_BYTES`` (default 4 MiB); an OptionError naming it unless a whole number."""
    value = os.environ.get("MABN_STREAM_BYTES")
    if value is None:
        return 4 << 20
    if not value.isdigit():
        raise OptionError("MABN_STREAM_BYTES (environment variable)", value, "is a whole number of bytes >= 0")
    return int(value)


#: Outputs of at least this many bytes are written with streaming stores; see the module docstring.
STREAM_BYTES = stream_bytes_from_env()

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
#: The extension's translation units and the headers they include (all of mabn/csrc).
SOURCES = ("bindings.cpp", "norm_kernels.cpp", "norm_statistics.cpp", "norm_layer.cpp")
HEADERS = ("norm_kernels.h", "norm_layer.h", "norm_statistics.h", "norm_types.h", "norm_util.h")
_CFLAGS = ("-O3", "-fno-math-errno", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_module = None  # the loaded extension; False once building failed
_lock = threading.Lock()


def build_key() -> str:
    """A hash of everything the built library depends on: the sources' content, the compiler
    flags, and the torch, Python and machine it is built for."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(_CSRC, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    digest.update(repr((_CFLAGS, _LDFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode())
    return digest.hexdigest()[:16]


def build_directory() -> str:
    """The build folder of this code: ``mabn_cpu_<build_key>`` under TORCH_EXTENSIONS_DIR or
    ``~/.cache/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return os.path.join(root, f"mabn_cpu_{build_key()}")


def _check_mode() -> None:
    if MODE not in MODES:
        raise OptionError("mabn.kernels.MODE (environment variable MABN_CPU_KERNELS)", MODE, 'is "auto" or "off"')


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; the ninja package (a dependency of
    mabn) installs it into the environment's bin directory, which is not on PATH when a virtual
    environment's python is run without activating it."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _copy_sources(directory: str) -> list[str]:
    """The sources copied into ``directory/src`` (each written atomically), so that the build
    never depends on which checkout started it; returns the translation units' paths."""
    src = os.path.join(directory, "src")
    os.makedirs(src, exist_ok=True)
    for name in SOURCES + HEADERS:
        target = os.path.join(src, name)
        if not os.path.exists(target):
            temporary = f"{target}.tmp.{os.getpid()}"
            shutil.copyfile(os.path.join(_CSRC, name), temporary)
            os.replace(temporary, target)
    return [os.path.join(src, name) for name in SOURCES]


def _import_library(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_or_build():
    """The extension of this code: loaded from its build folder, built there first if needed."""
    directory = build_directory()
    name = os.path.basename(directory)
    library = os.path.join(directory, name + ".so")
    if os.path.exists(library):
        return _import_library(name, library)
    sources = _copy_sources(directory)
    _ninja_on_path()
    # torch's builder logs notes about CUDA when imported on a machine without it (and mabn
    # builds CPU code only): imported here, when a build is needed, with its logger quiet.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(name=name, sources=sources, extra_cflags=list(_CFLAGS),
                                      extra_ldflags=list(_LDFLAGS), build_directory=directory,
                                      with_cuda=False, verbose=False)
    finally:
        cpp_logger.setLevel(level)


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
                _module = _load_or_build()
            except Exception as error:  # no compiler, no ninja, a failed build
                _module = False
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                warnings.warn(f"mabn.kernels: the CPU kernels could not be built ({type(error).__name__}: {first}); "
                              f"the layers use torch operations instead (same results, slower on the CPU; "
                              f"set MABN_CPU_KERNELS=off to skip the attempt)", RuntimeWarning)
    return _module or None


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
