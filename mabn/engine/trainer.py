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
exception once out_dir is this run's (locked; a crash, a dead peer, a full disk while writing
log.txt, env.json or a checkpoint) leaves status "failed" with the iteration reached and the error,
where the disk still takes that small file.

Nothing is written to out_dir until every check has passed: the config, the machine, the data, the
model, and on resume the checkpoint and its fit to the config (every setting that changes the
result is the checkpoint's: mabn.engine.config.check_checkpoint_fits). The run holds a lock on
out_dir while it runs.

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
from torch.autograd.profiler import record_function
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import checkpoint, data, distributed, files, models, run
from .classification import ClassificationTask
from .compiling import compile_module
from .config import ConfigError, check_checkpoint_fits, check_machine, config_changes
from .machine import steal_seconds
from .meters import WindowMeter
from .task import Task
from .registry import norm_options
from ..stats import StatisticsRecorder

try:  # numpy is optional; its RNG is saved when present
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

__all__ = ["train", "lr_at", "build_optimizer"]

log = logging.getLogger(__name__)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
    """metrics.json of the run (rank 0). :meth:`arm` once out_dir is this run's (locked): from
    then on a failure is recorded there; :meth:`start` when the run starts (status running);
    :meth:`fail` records a crash."""

    def __init__(self, path: str, is_main: bool):
        self.path, self.is_main, self.result, self.armed = path, is_main, None, None

    def arm(self, result: dict) -> None:
        """What a failure before :meth:`start` records (nothing is written yet)."""
        self.armed = result

    def start(self, result: dict) -> None:
        self.result = result
        self.write()

    def write(self) -> None:
        if self.is_main and self.result is not None:
            run.write_json(self.path, self.result)

    def fail(self, exc: BaseException, iteration: int) -> None:
        """status "failed" with the iteration reached and the exception's one-line summary, once
        out_dir is this run's; a refusal (ConfigError) before the start writes nothing. Best
        effort: on a full disk this write may fail too, which is logged."""
        if not self.is_main or (self.result is None and (self.armed is None or isinstance(exc, ConfigError))):
            return
        if self.result is None:
            self.result = dict(self.armed)
        summary = run.one_line(exc)
        self.result.update(status="failed", iteration=iteration, error=summary,
                           ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        note = ""
        try:
            self.write()
        except OSError as e:
            note = f" (could not record it in {self.path}: {e})"
        with contextlib.suppress(OSError):  # log.txt may be on the same full disk
            log.error("status failed at iteration %d: %s%s", iteration, summary, note)


@dataclass
class _State:
    """What the phases of a run share: the set-up (fixed after :func:`_build` and :func:`_resume`)
    and the progress (iteration, status, last validation)."""

    cfg: Any
    di: distributed.DistInfo
    stop: _StopFlag
    record: _Record
    task: Task
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
    cpu_start: float = 0.0  # time.process_time() at the start: metrics.json cpu_time_s
    steal_start: float | None = None  # the VM's steal time then (machine.steal_seconds)
    time_before: dict | None = None  # the earlier invocations' time (checkpoint "time"; None: unknown)
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


def train(cfg, task: Task | None = None) -> dict:
    """Run (or resume) the training described by the validated config ``cfg``: ``task`` gives
    the data, model, loss and validation (:class:`~mabn.engine.classification.ClassificationTask`
    by default; :mod:`mabn.engine.task` says what a task supplies).

    Returns the final metrics (also written to out_dir/metrics.json). An exception once out_dir is
    this run's is recorded there as status "failed" and re-raised.
    """
    check_machine(cfg)
    di = distributed.setup(cfg.device)
    s = _State(cfg, di, _StopFlag(), _Record(os.path.join(cfg.out_dir, "metrics.json"), di.is_main),
               task or ClassificationTask())
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
    s.cpu_start, s.steal_start = time.process_time(), steal_seconds()
    s.time_before = {"wall_s": 0.0, "cpu_s": 0.0, "first_started_at": s.started_at, "invocations": 0}
    run.setup_logging(cfg.out_dir, s.di.is_main, defer_file=True)  # log.txt once the run starts
    if _finished_record(s):
        log.info("the run in %s already finished (metrics.json: status finished at iteration %d); "
                 "nothing to do", cfg.out_dir, cfg.schedule.iterations)
        return run.read_json(s.record.path)
    _build(s)
    if not _resume(s):
        log.info("the run in %s already finished at iteration %d; nothing to do", cfg.out_dir, s.it)
        return run.read_json(s.record.path) if os.path.exists(s.record.path) else {"status": "finished",
                                                                                   "iteration": s.it}
    _start(s)
    batches = iter(s.stream)
    stop_at = min(cfg.schedule.iterations, cfg.stop_after or cfg.schedule.iterations)
    bar = tqdm(total=cfg.schedule.iterations, initial=s.it, dynamic_ncols=True, desc=cfg.name,
               disable=not (s.di.is_main and cfg.progress_bar))
    s.net.train()
    try:
        with logging_redirect_tqdm():
            while s.it < stop_at and s.status == "running":
                _train_step(s, batches, stop_at, bar)
    finally:
        batches.close()  # shuts the loader's worker processes down now, also when a step raised
        bar.close()
    return _finish(s)


def _finished_record(s: _State) -> bool:
    """resume=auto on an out_dir without checkpoints whose metrics.json records the run as
    finished at schedule.iterations: True (nothing to do) when its config.yaml is this run's up
    to :data:`~mabn.engine.config.RESUME_FREE_KEYS`; refused when it is not, or cannot be read."""
    cfg = s.cfg
    if cfg.resume != "auto" or checkpoint.list_checkpoints(s.ckpt_dir):
        return False
    try:
        m = run.read_json(s.record.path)
    except (OSError, ValueError):
        return False
    if not (isinstance(m, dict) and m.get("status") == "finished" and m.get("iteration") == cfg.schedule.iterations):
        return False
    saved = os.path.join(cfg.out_dir, "config.yaml")
    try:
        saved_cfg = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    except Exception as e:
        raise ConfigError(f"resume=auto: metrics.json records a finished run in {cfg.out_dir}, but its "
                          f"config {saved} cannot be read ({run.one_line(e)}), so it cannot be checked "
                          f"against this config; choose another out_dir") from None
    _warn_unchecked(check_checkpoint_fits(saved_cfg, cfg, m["iteration"], f"the finished run in {cfg.out_dir}"))
    return True


def _build(s: _State) -> None:
    """Data and model (the task's), optimizer, statistics recorder: every check that needs them,
    no writes."""
    cfg, di = s.cfg, s.di
    torch.manual_seed(cfg.seed)  # identical initialization on every rank
    random.seed(cfg.seed)
    if np is not None:
        np.random.seed(cfg.seed)
    with record_function("trainer::build"):
        s.task.build(s)
    s.net = s.model
    s.lr0 = base_lr(cfg, di.world_size)
    s.optimizer = build_optimizer(s.model, cfg, s.lr0)
    s.scaler = torch.amp.GradScaler(di.device.type, enabled=cfg.amp == "fp16")
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
    cfg = s.cfg
    if cfg.resume not in ("none", "auto"):
        try:
            s.checkpoint = checkpoint.load(cfg.resume)
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"resume={cfg.resume}: {e}") from None
        log.info("resuming from %s (iteration %d)", cfg.resume, s.checkpoint["iteration"])
        source = f"resume={cfg.resume}"
    elif cfg.resume == "none" and checkpoint.list_checkpoints(s.ckpt_dir):
        raise ConfigError(f"out_dir={cfg.out_dir} already holds checkpoints of a run; pass resume=auto to "
                          f"continue it, or choose another out_dir")
    _lock(s)
    if cfg.resume == "auto":
        source = _find_checkpoint(s)
    state = s.checkpoint
    if not state:
        return True
    s.it = state["iteration"]
    s.time_before = state.get("time")  # None: the checkpoint predates the record of time
    _warn_unchecked(check_checkpoint_fits(state["config"], cfg, s.it, f"resume: the checkpoint {source}"))
    _warn_free_changes(state["config"], cfg)
    if s.record.armed:
        s.record.armed["iteration"] = s.it
    if s.it == cfg.schedule.iterations and state.get("status") == "finished":
        return False
    models.load_weights({"model": s.model, "optimizer": s.optimizer, "scaler": s.scaler}, state)
    return True


def _lock(s: _State) -> None:
    """Rank 0 takes out_dir (held until the process ends), removes the temporaries of dead
    processes, and from here on a failure is recorded in metrics.json."""
    if not s.di.is_main:
        return
    s.lock = run.lock_out_dir(s.cfg.out_dir)
    s.record.arm(_running(s))
    for f in checkpoint.remove_stale_temporaries(s.ckpt_dir) + checkpoint.remove_stale_temporaries(s.cfg.out_dir):
        log.warning("removed %s, left by a process that died while writing it", f)


def _running(s: _State) -> dict:
    """The record of the run while it runs (metrics.json)."""
    return {"status": "running", "iteration": s.it, "iterations": s.cfg.schedule.iterations, "name": s.cfg.name}


def _find_checkpoint(s: _State) -> str | None:
    """resume=auto: the newest usable checkpoint of out_dir into ``s.checkpoint`` (its path is
    returned), none (a fresh start), or refused when every file there was rejected."""
    found, s.rejected = checkpoint.find_latest(s.ckpt_dir)
    if found:
        s.checkpoint, path = found
        log.info("resuming from %s (iteration %d)", path, s.checkpoint["iteration"])
        return path
    if s.rejected:
        raise ConfigError(
            f"resume=auto: no usable checkpoint in {s.ckpt_dir}; every file there was rejected "
            f"({', '.join(os.path.basename(f) for f in s.rejected)}; see the errors above). To start "
            f"over, move that folder away (mv {s.ckpt_dir} {s.ckpt_dir}.rejected) and run again, or "
            f"choose another out_dir")
    log.info("resume=auto: no checkpoint in %s, starting fresh", s.ckpt_dir)
    return None


def _warn_unchecked(keys: list[str]) -> None:
    """Log the keys of this config that the checkpoint's config predates (not compared)."""
    if keys:
        log.warning("the checkpoint's config predates these settings, which could not be checked: %s",
                    ", ".join(keys))


def _warn_free_changes(saved: dict, cfg) -> None:
    """Log the settings that differ from the checkpoint's (only keys free to differ get here)."""
    quiet = {"resume", "stop_after", "progress_bar", "data.workers", "keep_checkpoints", "out_dir"}
    changes, _ = config_changes(saved, cfg)
    shown = [f"{k}: {o!r} -> {v!r}" for k, (o, v) in changes.items() if k not in quiet]
    if shown:
        log.warning("resuming with settings that differ from the checkpoint's (free to differ, see "
                    "mabn.engine.config.RESUME_FREE_KEYS): %s", ", ".join(shown))


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
    log.info("world size %d, device %s; normalization: norm.layer=%s %s, weight centralization %s",
             di.world_size, di.device, cfg.norm.layer, norm_options(cfg.norm), cfg.norm.weight_centralization)
    log.info("%s", s.task.describe(s))
    if di.distributed:  # each rank keeps its own normalization statistics (paper, appendix B.2)
        s.net = DDP(s.model, device_ids=[di.device.index] if di.device.type == "cuda" else None,
                    broadcast_buffers=False)
    if cfg.compile:  # after channels_last and DDP; checkpoints and validation use s.model itself
        s.net = compile_module(s.net)
    if s.checkpoint:  # after DDP, whose constructor copies rank 0's buffers to every rank
        _restore_rank_state(s)
    log.info("%s: %.2fM parameters; lr %.4g (global batch %d), %d iterations",
             cfg.model.arch, sum(p.numel() for p in s.model.parameters()) / 1e6, s.lr0,
             cfg.data.batch_size * di.world_size, cfg.schedule.iterations)
    if di.is_main:
        from torch.utils.tensorboard import SummaryWriter  # heavy; only rank 0 of a starting run needs it
        s.writer = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=s.it + 1)
        # Drop the log lines written after the checkpoint (this run redoes those iterations).
        for log_name in ("train_log.jsonl", "val_log.jsonl"):
            _truncate_after(os.path.join(out_dir, log_name), s.it, lambda ln: json.loads(ln)["iteration"])
    if s.recorder:
        _truncate_after(os.path.join(out_dir, "statistics.csv"), s.it, lambda ln: int(ln.split(",", 1)[0]), header=1)
        s.recorder.writer = s.writer
    s.record.start(_running(s))


def _restore_rank_state(s: _State) -> None:
    """This rank's part of the checkpoint: normalization buffers, data position, RNG states and
    the open logging window (rank 0's when the world size changed: then the resume is not exact)."""
    state, di = s.checkpoint, s.di
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


def _train_step(s: _State, batches, stop_at: int, bar) -> None:
    """One iteration, in phases: the batch, the lr, :func:`_forward`, :func:`_agree` (one
    all-reduce of loss, non-finite flag and stop flag: a non-finite loss on some rank ends the run
    here, status diverged), :func:`_backward_step`, the meters, then :func:`_on_schedule`
    (logging, validation, checkpoints; a stop request or stop_after ends the run after a
    checkpoint, status interrupted)."""
    t0 = time.perf_counter()
    with record_function("trainer::data"):  # a named range in a torch profile (scripts/profile_run.py)
        inputs = s.task.to_device(s, next(batches))
    data_time = time.perf_counter() - t0
    s.it += 1
    lr = lr_at(s.cfg, s.it, s.lr0)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    loss, counts, samples = _forward(s, inputs)
    loss_sum, diverged_ranks, stop_requested = _agree(s, loss)
    if diverged_ranks:
        s.status = "diverged"
        log.error("iter %d: non-finite loss on %d rank(s); stopping (status diverged)", s.it, diverged_ranks)
        return
    _backward_step(s, loss, t0 + data_time)
    s.meter.update(loss_sum / s.di.world_size, counts, samples, data_time, time.perf_counter() - t0)
    bar.update(1)
    _on_schedule(s, lr, stop_requested, stop_at, bar)


def _forward(s: _State, inputs):
    """The task's (loss, window counts, images) under autocast when amp is set, with the injected
    faults of debug.*."""
    if s.recorder:
        s.recorder.start(s.it)
    with s.autocast():
        loss, counts, samples = s.task.forward(s, inputs)
    if s.cfg.debug.nan_loss_at == s.it:
        loss = loss * float("nan")
    if s.cfg.debug.fail_at == s.it:
        raise RuntimeError(f"debug.fail_at={s.it}: injected failure")
    return loss, counts, samples


def _agree(s: _State, loss) -> tuple[float, int, bool]:
    """What every rank must know before the step: (the sum of the finite losses, the number of
    ranks whose loss is non-finite, whether any rank was asked to stop)."""
    local = loss.detach().float()
    finite = bool(torch.isfinite(local))
    flags = distributed.all_reduce_sum(
        [local.item() if finite else 0.0, float(not finite), float(s.stop.signal is not None)], s.di.device)
    return flags[0].item(), int(flags[1]), bool(flags[2] > 0)


def _backward_step(s: _State, loss, t_forward: float) -> None:
    """Backward (loss scaled under fp16), the optimizer step; the time of the first compiled
    iteration since ``t_forward`` (its forward began) goes to log.txt."""
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    if s.recorder:
        s.recorder.finish()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    if s.cfg.compile and not s.compile_logged:
        s.compile_logged = True
        log.info("torch.compile: iteration %d, the first of this invocation, took %.1f s (forward and "
                 "backward compiled in it; data loading excluded); the next ones run the compiled code",
                 s.it, time.perf_counter() - t_forward)


def _on_schedule(s: _State, lr: float, stop_requested: bool, stop_at: int, bar) -> None:
    """After the step: the log line, validation and checkpoint when due; the status at the end,
    at a stop request or at stop_after (interrupted: with a checkpoint)."""
    cfg, it, end = s.cfg, s.it, s.cfg.schedule.iterations
    # Not at stop_after: the open window goes into the checkpoint, so a resumed run logs the
    # same lines as an uninterrupted one.
    if it % cfg.schedule.log_every == 0 or it == end:
        _log_train(s, lr, bar)
    if cfg.schedule.eval_every and it % cfg.schedule.eval_every == 0 and it != end:
        s.last_val = _evaluate(s)
    if it == end:
        s.status = "finished"
    elif stop_requested or it == stop_at:
        s.status = "interrupted"
        log.warning("iter %d: %s; writing a checkpoint and exiting (resume=auto continues)", it,
                    f"stop signal ({s.stop.signal or 'on another rank'}) received" if stop_requested
                    else f"stop_after={cfg.stop_after}")
        _save_checkpoint(s)
    elif it % cfg.schedule.ckpt_every == 0:
        _save_checkpoint(s)


def _evaluate(s: _State) -> dict:
    """The task's validation of the model at the current iteration (logged, to TensorBoard and,
    on rank 0, as one line of out_dir/val_log.jsonl: the curve of the validation numbers)."""
    with record_function("trainer::validation"):
        res = s.task.evaluate(s)
    res["iteration"] = s.it
    if s.di.is_main:
        run.append_jsonl(os.path.join(s.cfg.out_dir, "val_log.jsonl"), res)
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
            "val": s.last_val, "time": _time_so_far(s),
        }, s.ckpt_dir, s.cfg.keep_checkpoints)
        log.info("checkpoint %s", path)
    distributed.barrier()


def _finish(s: _State) -> dict:
    """The end: final validation and checkpoint when finished, metrics.json, TensorBoard hparams."""
    result = s.record.result
    result.update(status=s.status, iteration=s.it, train_loss=s.meter.last_loss, started_at=s.started_at,
                  ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  wall_time_s=round(time.perf_counter() - s.t_start, 1),  # of this invocation
                  cpu_time_s=round(time.process_time() - s.cpu_start, 1))  # this process's, same span
    total = _time_so_far(s)
    if total:  # over every invocation of the run (resumes included)
        result.update(total_wall_time_s=total["wall_s"], total_cpu_time_s=total["cpu_s"],
                      first_started_at=total["first_started_at"], invocations=total["invocations"])
    steal = steal_seconds()
    if steal is not None and s.steal_start is not None:
        result["machine_steal_s"] = round(steal - s.steal_start, 1)  # all of the VM's CPUs
    if s.status == "finished":
        s.last_val = _evaluate(s)
        _save_checkpoint(s)
    if s.status == "diverged":
        result.update(diverged_at=s.it, **dict.fromkeys(s.task.result_keys))
    elif s.last_val:
        result.update(s.task.result_metrics(s.last_val), val_iteration=s.last_val.get("iteration", s.it))
    s.record.write()
    if s.di.is_main:
        if s.status != "interrupted":
            _hparams(s.writer, s.cfg, result, s.task.result_keys)
        s.writer.close()
        log.info("status %s at iteration %d; %s", s.status, s.it, s.record.path)
    return result


def _time_so_far(s: _State) -> dict | None:
    """Wall and CPU time of the run over all its invocations until now: those up to the checkpoint
    it resumed from plus this one (time after a run's last checkpoint is lost with a crash); None
    when it resumed from a checkpoint written before checkpoints recorded it."""
    before = s.time_before
    if before is None:
        return None
    return {"wall_s": round(before["wall_s"] + time.perf_counter() - s.t_start, 1),
            "cpu_s": round(before["cpu_s"] + time.process_time() - s.cpu_start, 1),
            "first_started_at": before["first_started_at"], "invocations": before["invocations"] + 1}


def _params_digest(model: nn.Module) -> str | None:
    """SHA-256 of all parameters (to check that the ranks hold the same weights)."""
    if np is None:
        return None
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _log_train(s: _State, lr: float, bar) -> None:
    """Average the window over ranks and log it (stdout, train_log.jsonl, TensorBoard)."""
    meter, di = s.meter, s.di
    keys = sorted(meter.counts)
    sums = distributed.all_reduce_sum(
        [meter.samples, meter.data_time] + [meter.counts[k] for k in keys], di.device).tolist()
    samples, data_time, counts = sums[0], sums[1], dict(zip(keys, sums[2:]))
    metrics = s.task.window_metrics(counts, samples, meter.iters, di.world_size)
    row = {"iteration": s.it, "loss": meter.loss / meter.iters, **metrics, "lr": lr,
           "images_per_s": samples / meter.step_time, "data_time_s": data_time / (meter.iters * di.world_size)}
    meter.last_loss = row["loss"]
    if di.is_main:
        run.append_jsonl(os.path.join(s.cfg.out_dir, "train_log.jsonl"), row)
        for k in ("loss", *metrics, "lr"):
            s.writer.add_scalar(f"train/{k}", row[k], s.it)
        s.writer.add_scalar("perf/images_per_s", row["images_per_s"], s.it)
        s.writer.add_scalar("perf/data_time_s", row["data_time_s"], s.it)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        log.info("iter %d: loss %.4f, %s, lr %.4g, %.1f img/s, data %.3fs", s.it, row["loss"],
                 s.task.window_text(row), lr, row["images_per_s"], row["data_time_s"])
    meter.reset()


def _truncate_after(path: str, last_iter: int, iteration_of, header: int = 0) -> None:
    """Drop the lines of a log written after iteration ``last_iter`` (a resumed run redoes them),
    and a torn last line (a crash in the middle of an append); ``iteration_of(line)`` reads a
    line's iteration, the first ``header`` lines are kept. Rewritten atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    done = [(_iteration_or_none(iteration_of, ln), ln) for ln in lines[header:]]
    keep = lines[:header] + [ln for it, ln in done if it is not None and it <= last_iter]
    if len(keep) != len(lines):
        files.atomic_write({path: "".join(ln if ln.endswith("\n") else ln + "\n" for ln in keep)})


def _iteration_or_none(iteration_of, line: str) -> int | None:
    try:
        return iteration_of(line)
    except (ValueError, KeyError, TypeError):
        return None


def _hparams(writer, cfg, result: dict, metric_keys) -> None:
    """TensorBoard hparams summary: the normalization options and the final metrics."""
    hp = {f"norm.{k}": v for k, v in norm_options(cfg.norm).items()}
    hp["norm.layer"] = cfg.norm.layer
    hp["norm.weight_centralization"] = cfg.norm.weight_centralization
    hp.update({"model.arch": cfg.model.arch, "data.name": cfg.data.name,
               "data.batch_size": cfg.data.batch_size, "status": result["status"]})
    hp = {k: (str(v) if v is None else v) for k, v in hp.items()}
    nan = float("nan")
    metrics = {f"hparam/{k}": result[k] if result.get(k) is not None else nan for k in metric_keys}
    writer.add_hparams(hp, metrics, run_name=".", global_step=result["iteration"])
