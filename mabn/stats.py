"""Recording the batch statistics of Figures 2-4 (section 3.2, appendix B.1) during training.

For each chosen normalization layer, on every ``every``-th iteration, the recorder computes on the
same iteration, from the layer's input x and upstream gradient dL/dZ:

* ``small``: the statistics of the small normalization batch (the first ``small_batch_size``
  samples, by default the layer's ``norm_batch_size``, else 2);
* ``regular``: the statistics of the whole per-device batch;
* ``used``: for mabn family layers, the statistic the layer actually used for the first group:
  its ``bp_stats`` statistic (SMA / EMA / batch) in the forward pass and (g_u, Psi_u) in eq. 20.

Forward statistics: vanilla ``mu`` and ``sigma2`` (biased variance, eq. 2); modified ``chi2`` =
E[x^2] (eq. 15). Backward statistics (eq. 5): with Y the input normalized by the batch's own
statistics and dL/dY = weight * dL/dZ, ``g`` = mean of dL/dY (vanilla only) and ``psi`` = mean of
Y * dL/dY. Means run over the batch's samples and pixels, per channel; what is logged is the l2
norm over channels, as in the paper's figures.

Rows go to a CSV file (``iteration,layer,statistic,small,regular,used``) and, when a writer with
``add_scalar`` is given (e.g. ``torch.utils.tensorboard.SummaryWriter``), to TensorBoard under
``statistics/<layer>/<statistic>/<small|regular|used>``.

Cost: hooks are attached only for the iterations that record (``start(iteration)``) and removed
after that iteration's backward; a model without a recorder carries no hooks at all.
"""

from __future__ import annotations

import csv
import math
import os

import torch
from torch import nn

from .norm import BatchStatNorm2d

__all__ = ["StatisticsRecorder", "batch_statistics", "CSV_FIELDS"]

CSV_FIELDS = ("iteration", "layer", "statistic", "small", "regular", "used")


def _form(layer: nn.Module) -> str:
    return getattr(layer, "form", "vanilla")


def batch_statistics(x: torch.Tensor, dout: torch.Tensor | None, weight: torch.Tensor | None,
                     form: str = "vanilla", eps: float = 1e-5) -> dict[str, torch.Tensor]:
    """Per-channel statistics of one batch (float64): forward eq. 2 / 15, backward eq. 5.

    ``dout`` is dL/dZ for the batch (None: forward statistics only); dL/dY = weight * dL/dZ.
    """
    x = x.detach().double()
    dims = (0, 2, 3)
    out = {}
    if form == "vanilla":
        mu = x.mean(dims)
        var = x.var(dims, unbiased=False)
        out.update(mu=mu, sigma2=var)
        y = (x - mu[None, :, None, None]) / torch.sqrt(var + eps)[None, :, None, None]
    else:
        chi2 = x.pow(2).mean(dims)
        out.update(chi2=chi2)
        y = x / torch.sqrt(chi2 + eps)[None, :, None, None]
    if dout is not None:
        dy = dout.detach().double()
        if weight is not None:
            dy = dy * weight.detach().double()[None, :, None, None]
        if form == "vanilla":
            out["g"] = dy.mean(dims)
        out["psi"] = (dy * y).mean(dims)
    return out


class StatisticsRecorder:
    """Records small-batch, regular-batch and used statistics of chosen layers every k iterations.

    Args:
        model: the (possibly DDP-wrapped) model; layers are looked up by module name, with or
            without the ``module.`` prefix of DDP.
        layers: module names, default the paper's ``layer1.0.bn1``.
        every: record on iterations where ``iteration % every == 0``.
        csv_path: CSV file to append rows to (created with a header); None to skip.
        writer: object with ``add_scalar(tag, value, step)`` (TensorBoard); None to skip.
        small_batch_size: samples of the small batch; default: the layer's norm_batch_size, else 2.

    Usage per training iteration::

        recorder.start(it)          # before the forward
        loss.backward()
        recorder.finish()           # after the backward: writes the rows, removes the hooks
    """

    def __init__(self, model: nn.Module, layers=("layer1.0.bn1",), every: int = 10,
                 csv_path: str | None = None, writer=None, small_batch_size: int | None = None):
        if every < 1:
            raise ValueError(f"every={every!r} must be >= 1")
        modules = dict(model.named_modules())
        self.layers = {}
        for name in layers:
            module = modules.get(name, modules.get(f"module.{name}"))
            if module is None:
                candidates = [n for n, m in modules.items() if isinstance(m, (BatchStatNorm2d, nn.modules.batchnorm._NormBase, nn.GroupNorm))]
                raise ValueError(f"layer {name!r} is not a module of the model; normalization layers are "
                                 f"e.g. {candidates[:6]}")
            self.layers[name] = module
        self.every = every
        self.csv_path = csv_path
        self.writer = writer
        self.small_batch_size = small_batch_size
        self._handles: list = []
        self._pending: dict[str, dict] = {}
        self._iteration: int | None = None
        self.rows: list[dict] = []  # rows of the last recorded iteration

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def _small(self, layer, n):
        b = self.small_batch_size or getattr(layer, "norm_batch_size", None) or 2
        return min(b, n)

    def start(self, iteration: int) -> bool:
        """Attach the hooks if ``iteration`` is a recording iteration; returns whether it is."""
        self._remove()
        if iteration % self.every != 0:
            return False
        self._iteration = iteration
        self._pending = {}
        for name, layer in self.layers.items():
            if isinstance(layer, BatchStatNorm2d):
                layer.record_used_statistics = True
            self._handles.append(layer.register_forward_hook(self._forward_hook(name)))
        return True

    def _forward_hook(self, name):
        def hook(layer, inputs, output):
            if not layer.training:
                return
            x = inputs[0].detach()
            entry = {"x": x, "weight": getattr(layer, "weight", None)}
            self._pending[name] = entry
            if output.requires_grad:
                def grad_hook(dout):
                    entry["dout"] = dout.detach()
                self._handles.append(output.register_hook(grad_hook))
        return hook

    def finish(self) -> list[dict]:
        """Compute and write the rows of the current recording iteration; remove the hooks."""
        rows = []
        if self._handles:
            for name, entry in self._pending.items():
                rows += self._rows(name, self.layers[name], entry)
            self._write(rows)
        self._remove()
        self.rows = rows
        return rows

    def _rows(self, name, layer, entry):
        x, dout, weight = entry["x"], entry.get("dout"), entry["weight"]
        form, eps = _form(layer), getattr(layer, "eps", 1e-5)
        b = self._small(layer, x.shape[0])
        small = batch_statistics(x[:b], None if dout is None else dout[:b], weight, form, eps)
        regular = batch_statistics(x, dout, weight, form, eps)
        used = {}
        if isinstance(layer, BatchStatNorm2d):
            u = layer.used_statistics
            used = {"mu": u.get("mean"), "sigma2": u.get("var"), "chi2": u.get("chi2"),
                    "g": u.get("g"), "psi": u.get("psi")}
        rows = []
        for stat in regular:
            value = used.get(stat)
            rows.append({
                "iteration": self._iteration, "layer": name, "statistic": stat,
                "small": float(torch.linalg.vector_norm(small[stat])),
                "regular": float(torch.linalg.vector_norm(regular[stat])),
                "used": float(torch.linalg.vector_norm(value.double())) if value is not None else math.nan,
            })
        return rows

    def _write(self, rows):
        if self.writer is not None:
            for row in rows:
                for kind in ("small", "regular", "used"):
                    if not math.isnan(row[kind]):
                        self.writer.add_scalar(f"statistics/{row['layer']}/{row['statistic']}/{kind}",
                                               row[kind], row["iteration"])
        if self.csv_path is not None and rows:
            new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
            with open(self.csv_path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                if new:
                    w.writeheader()
                w.writerows(rows)

    def _remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers.values():
            if isinstance(layer, BatchStatNorm2d):
                layer.record_used_statistics = False

    def close(self):
        self._remove()
