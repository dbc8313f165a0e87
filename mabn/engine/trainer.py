"""The training loop (iteration based), read top to bottom as the algorithm.

``train(cfg)`` is called by train_imagenet.py with a validated config (:func:`config.load`). It
works as a plain single process and under torchrun (one process per GPU, DDP with
``broadcast_buffers=False`` so that every rank keeps its own normalization statistics, as in the
paper). Rank 0 logs, writes TensorBoard events, metrics.json and checkpoints.

Every iteration ends with one small all-reduce of (loss, non-finite flag, stop flag), so all ranks
agree on when to stop: a non-finite loss on any rank ends the run before the optimizer step with
status "diverged"; SIGTERM/SIGUSR1/SIGINT (pre-emption, Ctrl-C) or ``stop_after`` end it after the
step with a checkpoint and status "interrupted" (a second SIGINT exits at once). Both exit with
code 0 (the run ended as designed; the status says how); metrics.json is the place to look. Any
exception after the run has started (a crash, a dead peer, a full disk) leaves status "failed"
with the iteration reached and the error.

Nothing is written to out_dir until every check has passed: the config, the data, the model, and
on resume the checkpoint and its fit to the config. The run holds a lock on out_dir while it runs.

The phases, each a function of one :class:`_State` (what they share), in the order they run:
:func:`_build` (data, model, optimizer), :func:`_resume` (lock, checkpoint, fit, load),
:func:`_start` (out_dir is written from here on), :func:`_train_step` per iteration (with
:func:`_evaluate` and :func:`_save_checkpoint` on their schedules), :func:`_finish`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import checkpoint, data, distributed, models, run
from .compiling import compile_module, miscompiled_reason, unavailable_reason
from .config import ConfigError, check_machine, norm_options
from .meters import WindowMeter, evaluate, topk_correct
from ..stats import StatisticsRecorder

try:  # numpy is optional; its RNG is saved when present
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = ["train", "lr_at", "build_optimizer"]

log = logging.getLogger(__name__)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: Settings a resume must repeat: the checkpoint's weights, buffers and data position mean nothing
#: under others (a key ending in "." covers a whole section).
RESUME_FIXED = ("model.", "norm.", "data.name", "data.num_classes", "data.train_size", "data.noise",
                "data.image_size", "data.batch_size")


def lr_at(cfg, it: int, base_lr: float) -> float:
    """lr of iteration ``it`` (1-based). A pure function of the iteration, so resuming restores
    the schedule.

    With T = schedule.iterations and w = schedule.warmup_iters: iterations 1..w ramp linearly
    from warmup_factor x base_lr towards base_lr; then ``policy`` gives
    step: base_lr x gamma^(milestones passed), cosine: base_lr x (1 + cos(pi t)) / 2 and
    linear: base_lr x (1 - t), with t = (it - w - 1) / (T - w) the fraction of the post-warm-up
    iterations already done (so the first post-warm-up lr is base_lr and the last is above 0).
    """
    s = cfg.schedule
    w = s.warmup_iters
    if s.policy == "step":
        lr = base_lr * s.gamma ** sum(it > m for m in s.milestones)
    else:
        t = max(0, it - w - 1) / max(1, s.iterations - w)
        lr = base_lr * (0.5 * (1 + math.cos(math.pi * t)) if s.policy == "cosine" else 1 - t)
    if it <= w:
        lr *= s.warmup_factor + (1 - s.warmup_factor) * (it - 1) / w
    return lr


def base_lr(cfg, world_size: int) -> float:
    """optim.lr, or the linear scaling rule base_lr x global batch / reference_batch."""
    o = cfg.optim
    return o.lr if o.lr is not None else o.base_lr * cfg.data.batch_size * world_size / o.reference_batch


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.SGD:
    """SGD; weight decay on every parameter (the paper) unless optim.decay_norm_and_bias=false,
    which exempts 1-D parameters (gamma, beta, biases)."""
    o = cfg.optim
    if o.decay_norm_and_bias:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


def _rng_state() -> dict:
    """Every RNG state as tensors and numbers (checkpoints load as data only)."""
    version, words, gauss = random.getstate()
    state = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "torch": torch.get_rng_state()}
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    torch.set_rng_state(state["torch"])
    if np is not None and "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT; a second SIGINT raises KeyboardInterrupt at once (Ctrl-C
    twice: no checkpoint). The previous handlers are restored by :meth:`restore`."""

    def __init__(self):
        self.signal = None
        self._previous = {}
        for sig in _STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt("second SIGINT: stopped without a checkpoint")
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Record:
    """metrics.json of the run, once the run has started (rank 0); :meth:`fail` records a crash."""

    def __init__(self, path: str, is_main: bool):
        self.path, self.is_main, self.result = path, is_main, None

    def start(self, result: dict) -> None:
        self.result = result
        self.write()

    def write(self) -> None:
        if self.is_main and self.result is not None:
            run.write_json(self.path, self.result)

    def fail(self, exc: BaseException, iteration: int) -> None:
        """status "failed" with the iteration reached and the exception's one-line summary (best
        effort: on a full disk this write may fail too, which is logged)."""
        if self.result is None or not self.is_main:
            return
        summary = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
        self.result.update(status="failed", iteration=iteration, error=summary,
                           ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            self.write()
        except OSError as e:
            log.error("could not record the failure in %s: %s", self.path, e)
        log.error("status failed at iteration %d: %s", iteration, summary)


@dataclass
class _State:
    """What the phases of a run share: the set-up (fixed after :func:`_build` and :func:`_resume`)
    and the progress (iteration, status, last validation)."""

    cfg: Any
    di: distributed.DistInfo
    stop: _StopFlag
    record: _Record
    # set by _build
    train_set: Any = None
    val_set: Any = None
    num_classes: int = 0
    stream: data.TrainStream | None = None
    val_loader: Any = None
    model: nn.Module | None = None
    net: nn.Module | None = None  # the model, or its DDP and/or torch.compile wrapper
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    criterion: nn.Module | None = None
    lr0: float = 0.0
    recorder: StatisticsRecorder | None = None
    # set by _resume
    checkpoint: dict | None = None
    rejected: list = field(default_factory=list)
    # set by _start
    writer: Any = None
    meter: WindowMeter = field(default_factory=WindowMeter)
    lock: Any = None  # the open lock file of out_dir (rank 0), held until the process ends
    # progress
    it: int = 0
    status: str = "running"
    last_val: dict | None = None
    started_at: str = ""
    t_start: float = 0.0
    compile_logged: bool = False  # the first (compiling) iteration's time is in log.txt

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.out_dir, "checkpoints")

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)
        return torch.autocast(self.di.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def train(cfg) -> dict:
    """Run (or resume) the training described by the validated config ``cfg``.

    Returns the final metrics (also written to out_dir/metrics.json). An exception after the run
    has started is recorded there as status "failed" and re-raised.
    """
    check_machine(cfg)
    di = distributed.setup(cfg.device)
    s = _State(cfg, di, _StopFlag(), _Record(os.path.join(cfg.out_dir, "metrics.json"), di.is_main))
    try:
        return _train(s)
    except BaseException as e:
        s.record.fail(e, s.it)
        raise
    finally:
        s.stop.restore()
        distributed.cleanup()


def _train(s: _State) -> dict:
    """The run, phase by phase: nothing is written to out_dir before :func:`_start`."""
    cfg = s.cfg
    s.started_at, s.t_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    if cfg.norm.layer == "syncbn" and s.di.device.type != "cuda":
        raise ConfigError("norm.layer=syncbn needs device=cuda (nn.SyncBatchNorm is CUDA-only)")
    if cfg.compile:
        reason = unavailable_reason(s.di.device.type)
        if reason:
            raise ConfigError(f"compile=true, but torch.compile cannot run on this machine: {reason}; "
                              f"use compile=false")
        reason = miscompiled_reason(cfg.norm.layer)
        if reason:
            raise ConfigError(f"compile=true with norm.layer={cfg.norm.layer}: {reason}; use compile=false")
    run.setup_logging(cfg.out_dir, s.di.is_main, defer_file=True)  # log.txt once the run starts
    if cfg.resume == "auto" and not checkpoint.list_checkpoints(s.ckpt_dir) and _finished(s.record.path, cfg):
        log.info("the run in %s already finished (metrics.json: status finished at iteration %d); "
                 "nothing to do", cfg.out_dir, cfg.schedule.iterations)
        return run.read_json(s.record.path)
    _build(s)
    if not _resume(s):
        log.info("the run in %s already finished at iteration %d; nothing to do", cfg.out_dir, s.it)
        return run.read_json(s.record.path)
    _start(s)
    batches = iter(s.stream)
    stop_at = min(cfg.schedule.iterations, cfg.stop_after or cfg.schedule.iterations)
    bar = tqdm(total=cfg.schedule.iterations, initial=s.it, dynamic_ncols=True, desc=cfg.name,
               disable=not (s.di.is_main and cfg.progress_bar))
    s.net.train()
    with logging_redirect_tqdm():
        while s.it < stop_at and s.status == "running":
            _train_step(s, batches, stop_at, bar)
    bar.close()
    return _finish(s)


def _build(s: _State) -> None:
    """Data, model, optimizer, loss, statistics recorder: every check that needs them, no writes."""
    cfg, di = s.cfg, s.di
    torch.manual_seed(cfg.seed)  # identical initialization on every rank
    random.seed(cfg.seed)
    if np is not None:
        np.random.seed(cfg.seed)
    s.train_set, s.val_set, s.num_classes = data.build_datasets(cfg.data, cfg.seed)
    if cfg.model.num_classes is not None and cfg.model.num_classes < s.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is below the {s.num_classes} classes "
                          f"of the data ({cfg.data.name}); set it to null or >= {s.num_classes}")
    s.stream = data.TrainStream(s.train_set, cfg.data, cfg.seed, di.rank, di.world_size, di.device)
    s.val_loader = data.build_val_loader(s.val_set, cfg.data, di.rank, di.world_size, di.device)
    model = models.build_model(cfg.model, cfg.norm, cfg.model.num_classes or s.num_classes).to(di.device)
    s.model = s.net = model.to(memory_format=s.memory_format)
    s.lr0 = base_lr(cfg, di.world_size)
    s.optimizer = build_optimizer(s.model, cfg, s.lr0)
    s.scaler = torch.amp.GradScaler(di.device.type, enabled=cfg.amp == "fp16")
    s.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    if cfg.stats.enabled and di.is_main:  # Figures 2-4, from rank 0's batches
        try:
            s.recorder = StatisticsRecorder(s.model, list(cfg.stats.layers), cfg.stats.every,
                                            os.path.join(cfg.out_dir, "statistics.csv"), None,
                                            cfg.stats.small_batch_size)
        except ValueError as e:
            raise ConfigError(f"stats.layers: {e}") from None


def _resume(s: _State) -> bool:
    """Lock out_dir, find the checkpoint to continue from (if any), check that it fits the config
    and load it into the model and optimizer. False when there is nothing to do (the checkpoint
    finished the schedule). Still no writes, except the lock file and removing dead temporaries."""
    cfg, out_dir, ckpt_dir = s.cfg, s.cfg.out_dir, s.ckpt_dir
    if cfg.resume not in ("none", "auto"):
        try:
            s.checkpoint = checkpoint.load(cfg.resume)
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"resume={cfg.resume}: {e}") from None
        log.info("resuming from %s (iteration %d)", cfg.resume, s.checkpoint["iteration"])
    elif cfg.resume == "none" and checkpoint.list_checkpoints(ckpt_dir):
        raise ConfigError(f"out_dir={out_dir} already holds checkpoints of a run; pass resume=auto to "
                          f"continue it, or choose another out_dir")
    if s.di.is_main:
        s.lock = run.lock_out_dir(out_dir)  # held until the process ends
        for f in checkpoint.remove_stale_temporaries(ckpt_dir) + checkpoint.remove_stale_temporaries(out_dir):
            log.warning("removed %s, left by a process that died while writing it", f)
    if cfg.resume == "auto":
        found, s.rejected = checkpoint.find_latest(ckpt_dir)
        if found:
            s.checkpoint, path = found
            log.info("resuming from %s (iteration %d)", path, s.checkpoint["iteration"])
        elif s.rejected:
            raise ConfigError(
                f"resume=auto: no usable checkpoint in {ckpt_dir}; every file there was rejected "
                f"({', '.join(os.path.basename(f) for f in s.rejected)}; see the errors above). To start "
                f"over, move that folder away (mv {ckpt_dir} {ckpt_dir}.rejected) and run again, or "
                f"choose another out_dir")
        else:
            log.info("resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)
    state = s.checkpoint
    if not state:
        return True
    s.it = state["iteration"]
    if s.it == cfg.schedule.iterations and state.get("status") == "finished":
        return False
    changes = _config_changes(state["config"], cfg)
    _check_resume_fits(state, cfg, changes)
    _warn_config_changes(changes)
    try:
        s.model.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"resume: the checkpoint does not fit the model of this config: "
                          f"{str(e).strip().splitlines()[0]}") from None
    return True


def _start(s: _State) -> None:
    """The run starts writing out_dir: rejected checkpoints set aside, log.txt, provenance, DDP
    and torch.compile (compile=true), the per-rank state of the checkpoint, TensorBoard,
    metrics.json (status running)."""
    cfg, di, out_dir = s.cfg, s.di, s.cfg.out_dir
    if di.is_main:
        for f in s.rejected:  # kept for inspection, out of the way of resume and keep-last-K
            for g in (f, f + ".sha256"):
                if os.path.exists(g):
                    os.replace(g, g + ".rejected")
            log.warning("moved the rejected %s to %s.rejected", f, f)
        run.start_log_file(out_dir)
        run.write_provenance(cfg, out_dir, di.world_size)
    log.info("world size %d, device %s; normalization: %s, weight centralization %s", di.world_size,
             di.device, norm_options(cfg.norm), cfg.norm.weight_centralization)
    log.info("data %s: %d training / %d validation images, %d classes; %d batches of %d per rank "
             "per epoch", cfg.data.name, len(s.train_set), len(s.val_set), s.num_classes,
             s.stream.batches_per_epoch, cfg.data.batch_size)
    if di.distributed:  # each rank keeps its own normalization statistics (paper, appendix B.2)
        s.net = DDP(s.model, device_ids=[di.device.index] if di.device.type == "cuda" else None,
                    broadcast_buffers=False)
    if cfg.compile:  # after channels_last and DDP; checkpoints and validation use s.model itself
        s.net = compile_module(s.net)
    state = s.checkpoint
    if state:  # after DDP, whose constructor copies rank 0's buffers to every rank
        same_world = len(state["ranks"]) == di.world_size
        if not same_world:
            log.warning("checkpoint has %d ranks, this run %d: every rank resumes with rank 0's "
                        "normalization buffers and data position; the resume is not exact",
                        len(state["ranks"]), di.world_size)
        mine = state["ranks"][di.rank if same_world else 0]
        with torch.no_grad():
            for name, buf in s.model.named_buffers():
                buf.copy_(mine["buffers"][name])
        s.stream.load_state_dict(mine["data"])
        _set_rng_state(mine["rng"])
        s.meter.load_state_dict(mine["meter"])
        s.last_val = state.get("val")
        s.checkpoint = None  # not needed any more
    log.info("%s: %.2fM parameters; lr %.4g (global batch %d), %d iterations",
             cfg.model.arch, sum(p.numel() for p in s.model.parameters()) / 1e6, s.lr0,
             cfg.data.batch_size * di.world_size, cfg.schedule.iterations)
    if di.is_main:
        from torch.utils.tensorboard import SummaryWriter
        s.writer = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=s.it + 1)
        # Drop the log lines written after the checkpoint (this run redoes those iterations).
        _truncate_after(os.path.join(out_dir, "train_log.jsonl"), s.it, lambda ln: json.loads(ln)["iteration"])
    if s.recorder:
        _truncate_after(os.path.join(out_dir, "statistics.csv"), s.it, lambda ln: int(ln.split(",", 1)[0]), header=1)
        s.recorder.writer = s.writer
    s.record.start({"status": "running", "iteration": s.it, "iterations": cfg.schedule.iterations,
                    "name": cfg.name})


def _train_step(s: _State, batches, stop_at: int, bar) -> None:
    """One iteration: forward, one all-reduce of (loss, non-finite flag, stop flag), backward and
    step unless the loss is non-finite on some rank (status diverged), then logging, validation
    and checkpoints on their schedules; a stop request or stop_after ends the run after a
    checkpoint (status interrupted)."""
    cfg, di, device = s.cfg, s.di, s.di.device
    t0 = time.perf_counter()
    images, target = next(batches)
    images = images.to(device, non_blocking=True).contiguous(memory_format=s.memory_format)
    target = target.to(device, non_blocking=True)
    data_time = time.perf_counter() - t0
    s.it += 1
    it = s.it
    lr = lr_at(cfg, it, s.lr0)
    for group in s.optimizer.param_groups:
        group["lr"] = lr

    if s.recorder:
        s.recorder.start(it)
    with s.autocast():
        logits = s.net(images)
        loss = s.criterion(logits.float(), target)
    if cfg.debug.nan_loss_at == it:
        loss = loss * float("nan")
    if cfg.debug.fail_at == it:
        raise RuntimeError(f"debug.fail_at={it}: injected failure")

    local = loss.detach().float()
    flags = distributed.all_reduce_sum(
        [0.0 if not torch.isfinite(local) else local.item(),
         float(not torch.isfinite(local)), float(s.stop.signal is not None)], device)
    if flags[1] > 0:
        s.status = "diverged"
        log.error("iter %d: non-finite loss on %d rank(s); stopping (status diverged)", it, int(flags[1]))
        return

    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    if s.recorder:
        s.recorder.finish()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    if cfg.compile and not s.compile_logged:
        s.compile_logged = True
        log.info("torch.compile: iteration %d, the first of this invocation, took %.1f s (forward and "
                 "backward compiled in it; data loading excluded); the next ones run the compiled code",
                 it, time.perf_counter() - t0 - data_time)

    with torch.no_grad():
        c1, c5 = topk_correct(logits.detach(), target)
    s.meter.update(flags[0].item() / di.world_size, c1, c5, target.shape[0], data_time, time.perf_counter() - t0)
    bar.update(1)
    end = cfg.schedule.iterations
    # Not at stop_after: the open window goes into the checkpoint, so a resumed run logs the
    # same lines as an uninterrupted one.
    if it % cfg.schedule.log_every == 0 or it == end:
        _log_train(s.meter, it, lr, di, s.writer, os.path.join(cfg.out_dir, "train_log.jsonl"), bar)
    if cfg.schedule.eval_every and it % cfg.schedule.eval_every == 0 and it != end:
        s.last_val = _evaluate(s)
    if it == end:
        s.status = "finished"
    elif flags[2] > 0 or it == stop_at:
        s.status = "interrupted"
        log.warning("iter %d: %s; writing a checkpoint and exiting (resume=auto continues)", it,
                    f"stop signal ({s.stop.signal or 'on another rank'}) received" if flags[2] > 0
                    else f"stop_after={cfg.stop_after}")
        _save_checkpoint(s)
    elif it % cfg.schedule.ckpt_every == 0:
        _save_checkpoint(s)


def _evaluate(s: _State) -> dict:
    """Validation error of the model at the current iteration (logged, and to TensorBoard)."""
    res = evaluate(s.model, s.val_loader, s.di.device, s.cfg.channels_last, s.autocast())
    res["iteration"] = s.it
    log.info("iter %d: val top-1 error %.2f%%, top-5 error %.2f%% (%d images)", s.it,
             res["top1_err"], res["top5_err"], res["samples"])
    if s.writer:
        s.writer.add_scalar("val/top1_err", res["top1_err"], s.it)
        s.writer.add_scalar("val/top5_err", res["top5_err"], s.it)
    return res


def _save_checkpoint(s: _State) -> None:
    """Checkpoint of the current iteration: the weights, optimizer and lr scaler, and from every
    rank its normalization buffers, data position, RNG states and logging window."""
    ranks = distributed.all_gather_objects({
        "buffers": {k: v.detach().cpu() for k, v in s.model.named_buffers()},
        "data": s.stream.state_dict(),
        "rng": _rng_state(),
        "meter": s.meter.state_dict(),
        "params_sha256": _params_digest(s.model),  # ranks must agree (DDP); buffers need not
    })
    if s.di.is_main:
        path = checkpoint.save({
            "iteration": s.it, "status": s.status, "model": s.model.state_dict(),
            "optimizer": s.optimizer.state_dict(), "scaler": s.scaler.state_dict(),
            "ranks": ranks, "config": OmegaConf.to_container(s.cfg, resolve=True),
            "val": s.last_val,
        }, s.ckpt_dir, s.cfg.keep_checkpoints)
        log.info("checkpoint %s", path)
    distributed.barrier()


def _finish(s: _State) -> dict:
    """The end: final validation and checkpoint when finished, metrics.json, TensorBoard hparams."""
    result = s.record.result
    result.update(status=s.status, iteration=s.it, train_loss=s.meter.last_loss, started_at=s.started_at,
                  ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  wall_time_s=round(time.perf_counter() - s.t_start, 1))  # of this invocation
    if s.status == "finished":
        s.last_val = _evaluate(s)
        _save_checkpoint(s)
    if s.status == "diverged":
        result.update(diverged_at=s.it, val_top1_err=None, val_top5_err=None)
    elif s.last_val:
        result.update(val_top1_err=s.last_val["top1_err"], val_top5_err=s.last_val["top5_err"],
                      val_iteration=s.last_val.get("iteration", s.it))
    s.record.write()
    if s.di.is_main:
        if s.status != "interrupted":
            _hparams(s.writer, s.cfg, result)
        s.writer.close()
        log.info("status %s at iteration %d; %s", s.status, s.it, s.record.path)
    return result


def _finished(metrics_path: str, cfg) -> bool:
    """Whether metrics.json records this run as finished at schedule.iterations."""
    try:
        m = run.read_json(metrics_path)
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("status") == "finished" and m.get("iteration") == cfg.schedule.iterations


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _config_changes(saved: dict, cfg) -> dict[str, tuple]:
    """{flattened key: (checkpoint's value, this config's value)} for every setting that differs."""
    old, new = dict(_flat(saved)), dict(_flat(OmegaConf.to_container(cfg, resolve=True)))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def _check_resume_fits(state: dict, cfg, changes: dict[str, tuple]) -> None:
    """ConfigError, naming the keys, when the config does not fit the checkpoint: a different
    model, normalization or data (:data:`RESUME_FIXED`), or fewer iterations than it has done."""
    changed = [f"{k}={v!r} (checkpoint: {o!r})" for k, (o, v) in changes.items()
               if any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FIXED)]
    if changed:
        raise ConfigError(f"resume: the config does not fit the checkpoint of iteration {state['iteration']}: "
                          f"{', '.join(changed)}; resume with the checkpoint's settings or choose another out_dir")
    if cfg.schedule.iterations < state["iteration"]:
        raise ConfigError(f"schedule.iterations={cfg.schedule.iterations} is below the checkpoint's iteration "
                          f"{state['iteration']}; a resume cannot go back")


def _warn_config_changes(changes: dict[str, tuple]) -> None:
    """Log the settings that differ from the checkpoint's (a resume normally repeats them)."""
    ignore = {"resume", "stop_after", "progress_bar", "data.workers", "keep_checkpoints"}
    shown = [f"{k}: {o!r} -> {v!r}" for k, (o, v) in changes.items() if k not in ignore]
    if shown:
        log.warning("resuming with settings that differ from the checkpoint's: %s", ", ".join(shown))


def _params_digest(model: nn.Module) -> str | None:
    """SHA-256 of all parameters (to check that the ranks hold the same weights)."""
    if np is None:
        return None
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _log_train(meter: WindowMeter, it: int, lr: float, di, writer, path: str, bar) -> None:
    """Average the window over ranks and log it (stdout, train_log.jsonl, TensorBoard)."""
    sums = distributed.all_reduce_sum(
        [float(meter.correct1), float(meter.correct5), meter.samples, meter.data_time], di.device).tolist()
    c1, c5, samples, data_time = sums
    row = {"iteration": it, "loss": meter.loss / meter.iters, "top1_err": 100 * (1 - c1 / samples),
           "top5_err": 100 * (1 - c5 / samples), "lr": lr, "images_per_s": samples / meter.step_time,
           "data_time_s": data_time / (meter.iters * di.world_size)}
    meter.last_loss = row["loss"]
    if di.is_main:
        run.append_jsonl(path, row)
        for k in ("loss", "top1_err", "top5_err", "lr"):
            writer.add_scalar(f"train/{k}", row[k], it)
        writer.add_scalar("perf/images_per_s", row["images_per_s"], it)
        writer.add_scalar("perf/data_time_s", row["data_time_s"], it)
        bar.set_postfix(loss=f"{row['loss']:.3f}", err=f"{row['top1_err']:.1f}")
        logging.getLogger(__name__).info(
            "iter %d: loss %.4f, top-1 error %.2f%%, top-5 error %.2f%%, lr %.4g, %.1f img/s, data %.3fs",
            it, row["loss"], row["top1_err"], row["top5_err"], lr, row["images_per_s"], row["data_time_s"])
    meter.reset()


def _truncate_after(path: str, last_iter: int, iteration_of, header: int = 0) -> None:
    """Drop the lines of a log written after iteration ``last_iter`` (a resumed run redoes them);
    ``iteration_of(line)`` reads a line's iteration, the first ``header`` lines are kept."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = lines[:header] + [ln for ln in lines[header:] if iteration_of(ln) <= last_iter]
    if len(keep) != len(lines):
        with open(path, "w") as f:
            f.writelines(keep)


def _hparams(writer, cfg, result: dict) -> None:
    """TensorBoard hparams summary: the normalization options and the final errors."""
    hp = {f"norm.{k}": v for k, v in norm_options(cfg.norm).items()}
    hp["norm.weight_centralization"] = cfg.norm.weight_centralization
    hp.update({"model.arch": cfg.model.arch, "data.name": cfg.data.name,
               "data.batch_size": cfg.data.batch_size, "status": result["status"]})
    hp = {k: (str(v) if v is None else v) for k, v in hp.items()}
    nan = float("nan")
    metrics = {"hparam/val_top1_err": result.get("val_top1_err") if result.get("val_top1_err") is not None else nan,
               "hparam/val_top5_err": result.get("val_top5_err") if result.get("val_top5_err") is not None else nan}
    writer.add_hparams(hp, metrics, run_name=".", global_step=result["iteration"])
