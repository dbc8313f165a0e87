"""Where a training iteration's time goes: the torch profiler's CPU events, attributed to parts.

:func:`label_layers` marks every forward of a convolution and of a normalization layer with a
profiler range (global module hooks, so any model built anywhere is covered); the backward pass is
attributed by the autograd node that runs it (``ConvolutionBackward0``, mabn's ``Normalize`` /
``_TrainStep`` backward, BatchNorm's ...). :func:`attribute` then charges every event's own
(self) CPU time to the trainer's phase it runs in (its ``trainer::*`` ranges: setup, the batch,
validation) or else to the innermost part it runs inside; time inside no part is "other" (the
loss, the metrics, the statistics recorder, elementwise bookkeeping). Used by
``scripts/profile_run.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
from torch import nn
from torch.autograd.profiler import record_function

from ..norm import BatchStatNorm2d

#: The parts, in the order reports list them, with the event names (prefix matches) that open one.
#: Forward ranges come from :func:`label_layers`; backward ones are the autograd engine's
#: ``autograd::engine::evaluate_function: <Node>`` events.
PARTS = {
    "convolution": ("part::convolution", "ConvolutionBackward", "MkldnnConvolutionBackward"),
    "weight centralization": ("_Centralize",),  # its autograd function, forward and backward
    "normalization": ("part::normalization", "Normalize", "_TrainStep", "NativeBatchNormBackward",
                      "NativeGroupNormBackward"),
    "activation, pooling, linear": ("ReluBackward", "ThresholdBackward", "MaxPool2DWithIndicesBackward",
                                    "MeanBackward", "AdaptiveAvgPool2DBackward", "AddmmBackward",
                                    "aten::relu", "aten::max_pool2d", "aten::adaptive_avg_pool2d",
                                    "aten::linear", "aten::addmm"),
    "optimizer": ("Optimizer.step", "Optimizer.zero_grad"),
}
#: Phases of a run outside the training step (the trainer's own profiler ranges): everything
#: inside them is charged to them, whatever layer it runs in.
PHASES = {"setup (data set, model)": "trainer::build", "validation": "trainer::validation",
          "data (the batch)": "trainer::data"}
_NORMS = (BatchStatNorm2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def part_of(name: str) -> str | None:
    """The part an event of this name opens, or None."""
    name = name.removeprefix("autograd::engine::evaluate_function: ")
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    return None


@contextlib.contextmanager
def label_layers():
    """Within the block, every forward of a convolution (nn.Conv2d, mabn.CenConv2d) and of a
    normalization layer runs inside a profiler range named after its part."""
    stack = []

    def pre(module, args):
        label = ("part::normalization" if isinstance(module, _NORMS) else
                 "part::convolution" if isinstance(module, nn.Conv2d) else None)
        if label is not None:
            rf = record_function(label)
            rf.__enter__()
            stack.append((module, rf))

    def post(module, args, output):
        if stack and stack[-1][0] is module:
            stack.pop()[1].__exit__(None, None, None)

    handles = [nn.modules.module.register_module_forward_pre_hook(pre),
               nn.modules.module.register_module_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def iteration_clock():
    """Yields a list that gets the process's CPU time (time.process_time: not inflated by other
    processes on the same cores, unlike the profiler's wall-clock event times) at the start of
    every training-mode forward of the first module called in the block: the model, once per
    iteration."""
    cpu_times, root = [], []

    def pre(module, args):
        if not root:
            root.append(module)
        if module is root[0] and module.training:
            cpu_times.append(time.process_time())

    handle = nn.modules.module.register_module_forward_pre_hook(pre)
    try:
        yield cpu_times
    finally:
        handle.remove()


def iteration_starts(events) -> list[float]:
    """Start times (microseconds, the profiler's clock) of the training iterations: the trainer's
    ``trainer::data`` ranges, in order."""
    return sorted(ev.time_range.start for ev in events if ev.name == PHASES["data (the batch)"])


def attribute(events, start_us: float | None = None) -> dict[str, float]:
    """Seconds of self CPU time per phase and part (and "other") over the profiler's ``events``
    (``prof.events()``; only those that start at or after ``start_us``): an event's own time goes
    to the trainer phase it runs in (PHASES), else to the innermost part enclosing it (PARTS),
    else to "other"."""
    phase_of = {name: phase for phase, name in PHASES.items()}
    out = defaultdict(float)
    for ev in events:
        if start_us is not None and ev.time_range.start < start_us:
            continue
        node, part, phase = ev, None, None
        while node is not None and phase is None:
            phase = phase_of.get(node.name)
            part = part or part_of(node.name)
            node = node.cpu_parent
        out[phase or part or "other"] += ev.self_cpu_time_total / 1e6
    return dict(out)
