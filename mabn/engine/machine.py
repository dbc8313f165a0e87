"""The machine a run or a benchmark ran on, as recorded with every figure: the CPU's model name
and the vector instruction set torch's kernels dispatch to (speed ratios move with both), and
the load average (other processes on the machine)."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["cpu_model", "cpu_identity", "cpu_capability", "load_average", "steal_seconds"]


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


def cpu_identity() -> dict:
    """What tells CPUs of one model name apart ("AMD EPYC" is Zen 3 or Zen 4 or Zen 5): the
    family and model numbers and the per-core cache size /proc/cpuinfo reports (L2 on AMD, the
    last level on Intel); empty off Linux."""
    keys = {"cpu family": "family", "model": "model", "cache size": "cache_size"}
    out = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    out[keys[key.strip()]] = value.strip()
    except OSError:
        pass
    return out


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to other guests, summed over this machine's CPUs since boot
    (/proc/stat's steal column), or None where it is not known. A run's share of it says whether
    the virtual machine itself was starved."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


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
