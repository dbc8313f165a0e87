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

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import checkpoint, data, distributed, models, run
from .config import ConfigError, check_machine, norm_options
from .meters import WindowMeter, evaluate
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
    policy = getattr(s, "policy", "step")
    w = s.warmup_iters
    if policy == "step":
        lr = base_lr * s.gamma ** sum(it > m for m in s.milestones)
    else:
        t = max(0, it - w - 1) / max(1, s.iterations - w)
        lr = base_lr * (0.5 * (1 + math.cos(math.pi * t)) if policy == "cosine" else 1 - t)
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


def train(cfg) -> dict:
    """Run (or resume) the training described by the validated config ``cfg``.

    Returns the final metrics (also written to out_dir/metrics.json). An exception after the run
    has started is recorded there as status "failed" and re-raised.
    """
    check_machine(cfg)
    dist_info = distributed.setup(cfg.device)
    stop = _StopFlag()
    record = _Record(os.path.join(cfg.out_dir, "metrics.json"), dist_info.is_main)
    progress = {"iteration": 0}
    try:
        return _train(cfg, dist_info, stop, record, progress)
    except BaseException as e:
        record.fail(e, progress["iteration"])
        raise
    finally:
        stop.restore()
        distributed.cleanup()


def _train(cfg, di: distributed.DistInfo, stop: _StopFlag, record: _Record, progress: dict) -> dict:
    device, out_dir = di.device, cfg.out_dir
    t_start, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    metrics_path = os.path.join(out_dir, "metrics.json")
    if cfg.norm.layer == "syncbn" and device.type != "cuda":
        raise ConfigError("norm.layer=syncbn needs device=cuda (nn.SyncBatchNorm is CUDA-only)")
    run.setup_logging(out_dir, di.is_main, defer_file=True)  # log.txt once the run starts
    if cfg.resume == "auto" and not checkpoint.list_checkpoints(ckpt_dir) and _finished(metrics_path, cfg):
        log.info("the run in %s already finished (metrics.json: status finished at iteration %d); "
                 "nothing to do", out_dir, cfg.schedule.iterations)
        return run.read_json(metrics_path)

    # ---- 1. Data, model, optimizer, loss (every check before anything is written) -------------
    torch.manual_seed(cfg.seed)  # identical initialization on every rank
    random.seed(cfg.seed)
    if np is not None:
        np.random.seed(cfg.seed)
    train_set, val_set, num_classes = data.build_datasets(cfg.data, cfg.seed)
    if cfg.model.num_classes is not None and cfg.model.num_classes < num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} is below the {num_classes} classes "
                          f"of the data ({cfg.data.name}); set it to null or >= {num_classes}")
    stream = data.TrainStream(train_set, cfg.data, cfg.seed, di.rank, di.world_size, device)
    val_loader = data.build_val_loader(val_set, cfg.data, di.rank, di.world_size, device)
    model = models.build_model(cfg.model, cfg.norm, cfg.model.num_classes or num_classes).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    lr0 = base_lr(cfg, di.world_size)
    optimizer = build_optimizer(model, cfg, lr0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    recorder = None
    if cfg.stats.enabled and di.is_main:  # Figures 2-4, from rank 0's batches
        try:
            recorder = StatisticsRecorder(model, list(cfg.stats.layers), cfg.stats.every,
                                          os.path.join(out_dir, "statistics.csv"), None,
                                          cfg.stats.small_batch_size)
        except ValueError as e:
            raise ConfigError(f"stats.layers: {e}") from None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    # ---- 2. Fresh start or resume (resume=auto reads out_dir under its lock) --------------------
    state, rejected = None, []
    if cfg.resume not in ("none", "auto"):
        try:
            state = checkpoint.load(cfg.resume)
        except checkpoint.CheckpointError as e:
            raise ConfigError(f"resume={cfg.resume}: {e}") from None
        log.info("resuming from %s (iteration %d)", cfg.resume, state["iteration"])
    elif cfg.resume == "none" and checkpoint.list_checkpoints(ckpt_dir):
        raise ConfigError(f"out_dir={out_dir} already holds checkpoints of a run; pass resume=auto to "
                          f"continue it, or choose another out_dir")
    lock = run.lock_out_dir(out_dir) if di.is_main else None  # noqa: F841  (held until exit)
    if di.is_main:
        for f in checkpoint.remove_stale_temporaries(ckpt_dir) + checkpoint.remove_stale_temporaries(out_dir):
            log.warning("removed %s, left by a process that died while writing it", f)
    if cfg.resume == "auto":
        found, rejected = checkpoint.find_latest(ckpt_dir)
        if found:
            state, path = found
            log.info("resuming from %s (iteration %d)", path, state["iteration"])
        elif rejected:
            raise ConfigError(
                f"resume=auto: no usable checkpoint in {ckpt_dir}; every file there was rejected "
                f"({', '.join(os.path.basename(f) for f in rejected)}; see the errors above). To start "
                f"over, move that folder away (mv {ckpt_dir} {ckpt_dir}.rejected) and run again, or "
                f"choose another out_dir")
        else:
            log.info("resume=auto: no checkpoint in %s, starting fresh", ckpt_dir)
    start_iter = state["iteration"] if state else 0
    end_iter = cfg.schedule.iterations
    if state and start_iter == end_iter and state.get("status") == "finished":
        log.info("the run in %s already finished at iteration %d; nothing to do", out_dir, start_iter)
        return run.read_json(metrics_path)
    if state:
        _check_resume_fits(state, cfg)
        _warn_config_changes(state["config"], cfg)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"resume: the checkpoint does not fit the model of this config: "
                              f"{str(e).strip().splitlines()[0]}") from None

    # ---- 3. The run starts: from here on out_dir is written ------------------------------------
    if di.is_main:
        for f in rejected:  # kept for inspection, out of the way of resume and keep-last-K
            for g in (f, f + ".sha256"):
                if os.path.exists(g):
                    os.replace(g, g + ".rejected")
            log.warning("moved the rejected %s to %s.rejected", f, f)
        run.start_log_file(out_dir)
        run.write_provenance(cfg, out_dir, di.world_size)
    log.info("world size %d, device %s; normalization: %s, weight centralization %s", di.world_size,
             device, norm_options(cfg.norm), cfg.norm.weight_centralization)
    log.info("data %s: %d training / %d validation images, %d classes; %d batches of %d per rank "
             "per epoch", cfg.data.name, len(train_set), len(val_set), num_classes,
             stream.batches_per_epoch, cfg.data.batch_size)
    net = model
    if di.distributed:  # each rank keeps its own normalization statistics (paper, appendix B.2)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  broadcast_buffers=False)
    meter = WindowMeter()
    if state:  # after DDP, whose constructor copies rank 0's buffers to every rank
        same_world = len(state["ranks"]) == di.world_size
        if not same_world:
            log.warning("checkpoint has %d ranks, this run %d: every rank resumes with rank 0's "
                        "normalization buffers and data position; the resume is not exact",
                        len(state["ranks"]), di.world_size)
        mine = state["ranks"][di.rank if same_world else 0]
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(mine["buffers"][name])
        stream.load_state_dict(mine["data"])
        _set_rng_state(mine["rng"])
        if "meter" in mine:
            meter.load_state_dict(mine["meter"])
    log.info("%s: %.2fM parameters; lr %.4g (global batch %d), %d iterations",
             cfg.model.arch, sum(p.numel() for p in model.parameters()) / 1e6, lr0,
             cfg.data.batch_size * di.world_size, end_iter)

    # ---- 4. Logging outputs (rank 0) ----------------------------------------------------------
    writer = None
    train_log = os.path.join(out_dir, "train_log.jsonl")
    if di.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start_iter + 1)
        # Drop the log lines written after the checkpoint (this run redoes those iterations).
        _truncate_after(train_log, start_iter, lambda ln: json.loads(ln)["iteration"])
    if recorder:
        stats_csv = os.path.join(out_dir, "statistics.csv")
        _truncate_after(stats_csv, start_iter, lambda ln: int(ln.split(",", 1)[0]), header=1)
        recorder.writer = writer
    result = {"status": "running", "iteration": start_iter, "iterations": end_iter, "name": cfg.name}
    progress["iteration"] = start_iter
    record.start(result)

    def save_checkpoint(it: int, status: str) -> None:
        ranks = distributed.all_gather_objects({
            "buffers": {k: v.detach().cpu() for k, v in model.named_buffers()},
            "data": stream.state_dict(),
            "rng": _rng_state(),
            "meter": meter.state_dict(),
            "params_sha256": _params_digest(model),  # ranks must agree (DDP); buffers need not
        })
        if di.is_main:
            path = checkpoint.save({
                "iteration": it, "status": status, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "ranks": ranks, "config": OmegaConf.to_container(cfg, resolve=True),
                "val": last_val,
            }, ckpt_dir, cfg.keep_checkpoints)
            log.info("checkpoint %s", path)
        distributed.barrier()

    def validate(it: int) -> dict:
        res = evaluate(model, val_loader, device, cfg.channels_last, autocast())
        res["iteration"] = it
        log.info("iter %d: val top-1 error %.2f%%, top-5 error %.2f%% (%d images)", it,
                 res["top1_err"], res["top5_err"], res["samples"])
        if writer:
            writer.add_scalar("val/top1_err", res["top1_err"], it)
            writer.add_scalar("val/top5_err", res["top5_err"], it)
        return res

    # ---- 5. The loop ------------------------------------------------------------------------------
    last_val = state.get("val") if state else None
    stop_at = min(end_iter, cfg.stop_after or end_iter)
    status, it = "running", start_iter
    batches = iter(stream)
    net.train()
    bar = tqdm(total=end_iter, initial=start_iter, disable=not (di.is_main and cfg.progress_bar),
               dynamic_ncols=True, desc=cfg.name)
    with logging_redirect_tqdm():
        while it < stop_at:
            t0 = time.perf_counter()
            images, target = next(batches)
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            target = target.to(device, non_blocking=True)
            data_time = time.perf_counter() - t0
            it += 1
            progress["iteration"] = it
            lr = lr_at(cfg, it, lr0)
            for group in optimizer.param_groups:
                group["lr"] = lr

            if recorder:
                recorder.start(it)
            with autocast():
                logits = net(images)
                loss = criterion(logits.float(), target)
            if cfg.debug.nan_loss_at == it:
                loss = loss * float("nan")
            if cfg.debug.fail_at == it:
                raise RuntimeError(f"debug.fail_at={it}: injected failure")

            # One all-reduce: summed loss, any non-finite loss, any stop request.
            local = loss.detach().float()
            flags = distributed.all_reduce_sum(
                [0.0 if not torch.isfinite(local) else local.item(),
                 float(not torch.isfinite(local)), float(stop.signal is not None)], device)
            if flags[1] > 0:
                status = "diverged"
                log.error("iter %d: non-finite loss on %d rank(s); stopping (status diverged)", it, int(flags[1]))
                break

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recorder:
                recorder.finish()
            scaler.step(optimizer)
            scaler.update()

            with torch.no_grad():
                c1, c5 = _topk_correct(logits.detach(), target)
            meter.update(flags[0].item() / di.world_size, c1, c5, target.shape[0], data_time,
                         time.perf_counter() - t0)
            bar.update(1)
            if it % cfg.schedule.log_every == 0 or it == end_iter:  # not at stop_at: see WindowMeter
                _log_train(meter, it, lr, di, writer, train_log, bar)
            if cfg.schedule.eval_every and it % cfg.schedule.eval_every == 0 and it != end_iter:
                last_val = validate(it)
            if it == end_iter:
                status = "finished"
            elif flags[2] > 0 or it == stop_at:
                status = "interrupted"
                log.warning("iter %d: %s; writing a checkpoint and exiting (resume=auto continues)", it,
                            f"stop signal ({stop.signal or 'on another rank'}) received" if flags[2] > 0 else f"stop_after={cfg.stop_after}")
                save_checkpoint(it, status)
                break
            elif it % cfg.schedule.ckpt_every == 0:
                save_checkpoint(it, "running")
    bar.close()

    # ---- 6. The end: final validation, checkpoint, metrics ---------------------------------------
    result.update(status=status, iteration=it, train_loss=meter.last_loss, started_at=started_at,
                  ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  wall_time_s=round(time.perf_counter() - t_start, 1))  # of this invocation
    if status == "finished":
        last_val = validate(it)
        save_checkpoint(it, status)
    if status == "diverged":
        result.update(diverged_at=it, val_top1_err=None, val_top5_err=None)
    elif last_val:
        result.update(val_top1_err=last_val["top1_err"], val_top5_err=last_val["top5_err"],
                      val_iteration=last_val.get("iteration", it))
    record.write()
    if di.is_main:
        if status != "interrupted":
            _hparams(writer, cfg, result)
        writer.close()
        log.info("status %s at iteration %d; %s", status, it, metrics_path)
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


def _check_resume_fits(state: dict, cfg) -> None:
    """ConfigError, naming the keys, when the config does not fit the checkpoint: a different
    model, normalization or data (:data:`RESUME_FIXED`), or fewer iterations than it has done."""
    old, new = dict(_flat(state["config"])), dict(_flat(OmegaConf.to_container(cfg, resolve=True)))
    fixed = [k for k in sorted(old.keys() | new.keys())
             if any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FIXED)]
    changed = [f"{k}={new.get(k)!r} (checkpoint: {old.get(k)!r})" for k in fixed if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"resume: the config does not fit the checkpoint of iteration {state['iteration']}: "
                          f"{', '.join(changed)}; resume with the checkpoint's settings or choose another out_dir")
    if cfg.schedule.iterations < state["iteration"]:
        raise ConfigError(f"schedule.iterations={cfg.schedule.iterations} is below the checkpoint's iteration "
                          f"{state['iteration']}; a resume cannot go back")


def _warn_config_changes(saved: dict, cfg) -> None:
    """Log the settings that differ from the checkpoint's (a resume normally repeats them)."""
    ignore = {"resume", "stop_after", "progress_bar", "data.workers", "keep_checkpoints"}

    old, new = dict(_flat(saved)), dict(_flat(OmegaConf.to_container(cfg, resolve=True)))
    changed = sorted(k for k in old.keys() | new.keys() if k not in ignore and old.get(k) != new.get(k))
    if changed:
        log.warning("resuming with settings that differ from the checkpoint's: %s",
                    ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))


def _params_digest(model: nn.Module) -> str | None:
    """SHA-256 of all parameters (to check that the ranks hold the same weights)."""
    if np is None:
        return None
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _topk_correct(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(target[:, None])
    return hit[:, :1].any(1).sum(), hit.any(1).sum()


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
