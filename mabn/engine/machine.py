"""The machine a run or a benchmark ran on, as recorded with every figure: the CPU's model name
and the vector instruction set torch's kernels dispatch to (speed ratios move with both), and
the load average (other processes on the machine)."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["cpu_model", "cpu_capability", "load_average"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels dispatch to here ("AVX2", "AVX512", ...).

    It moves the speed ratios between layers: torch's own kernels (convolutions through oneDNN,
    nn.BatchNorm2d) are vectorized per instruction set, so the same code runs at a different
    ratio to them on an AVX2 AMD EPYC and on an AVX-512 Intel Xeon."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other processes on the machine), or "n/a"."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
