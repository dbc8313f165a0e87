"""Structured configuration of a training run, its validation, and what a resume must repeat.

Every field is documented where it is defined (the string under it). The Hydra YAML files under
``configs/`` fill these dataclasses; :func:`load` merges any OmegaConf/dict config onto the schema
(unknown keys and wrong types are rejected by OmegaConf) and :func:`validate` checks the values,
one function per config group (``validate_norm``, ``validate_data``, ...), each rule once, so that
a bad run stops before any work with a message naming the key. What depends on the machine
(a GPU, torch.compile) is checked by :func:`check_machine` where the run starts.

A checkpoint may only be continued (or evaluated) under the settings it was trained with:
:func:`check_checkpoint_fits` compares the checkpoint's saved config with the new one, key by
key; :data:`RESUME_FREE_KEYS` lists, each with its reason, the keys a resume may change.

The paper's setting (appendix B.2): ResNet-50, 8 GPUs x 32 images, normalization groups of
``norm.norm_batch_size`` images, SGD momentum 0.9, weight decay 1e-4 on every parameter,
lr 0.1 x global batch / 256, 600k iterations with lr / 10 at 150k, 300k and 450k.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from mabn import LAYER_OPTIONS, OptionError, check_options

from .compiling import miscompiled_reason, unavailable_reason
from .distributed import device_type
from .registry import ARCHS, LEGACY_NORM_LAYERS, NORM_LAYERS, channel_widths, norm_options

__all__ = ["NormConfig", "ModelConfig", "DataConfig", "ScheduleConfig", "OptimConfig",
           "StatsConfig", "DebugConfig", "Config", "EvalConfig", "ConfigError", "load", "validate",
           "validate_norm", "validate_model", "validate_data", "validate_schedule", "validate_optim",
           "validate_stats", "validate_debug", "validate_run", "check_machine", "check_num_classes",
           "norm_options", "RESUME_FREE_KEYS", "RENAMED_KEYS", "upgrade_saved_config",
           "config_changes", "check_checkpoint_fits"]


class ConfigError(ValueError):
    """An invalid configuration value; the message names the offending key."""


@dataclass
class NormConfig:
    """Normalization layers: the option names of ``mabn.build_norm`` plus weight centralization."""

    layer: str = "batchstat"
    """Which layer: "batchstat" (the configurable family mabn.BatchStatNorm2d, whose form,
    fp_stats, bp_stats and the other options below make it BN, BRN, the modified normalization,
    MABN or any ablation of the paper), "bn" (torch's nn.BatchNorm2d, the regular-batch
    reference), "syncbn" (batch statistics over all ranks: nn.SyncBatchNorm, on
    the CPU over gloo as mabn.SyncBatchNorm2d; one process: its whole batch), "gn" (nn.GroupNorm). The
    old name of "batchstat", "mabn", is still accepted (and saved as "batchstat")."""
    form: str = "vanilla"
    """"vanilla" (centre by the mean, scale by the std; eq. 1) or "modified" (scale by
    sqrt(E[x^2]), no centring; eq. 15, the "w/o centralizing feature maps" column of Table 4)."""
    fp_stats: str = "batch"
    """Statistics the forward pass normalizes with: "batch", "ema" (EMAS) or "sma" (SMAS)."""
    bp_stats: str = "batch"
    """Statistics of the backward pass: "batch", "ema" or "sma" (Table 4's "BP statistics")."""
    norm_batch_size: Optional[int] = None
    """Images per normalization group (the paper's |B|); the per-GPU batch is split into
    data.batch_size / norm_batch_size groups (appendix B.2). null = the whole per-GPU batch
    ("regular": 32 in the paper). Only for layer=batchstat."""
    alpha: float = 0.9
    """The paper's alpha (eq. 12): the weight of the OLD value in the exponential moving averages,
    ema <- alpha * ema + (1 - alpha) * batch statistic, in [0, 1). NOT torch's BatchNorm momentum,
    which weights the new value and equals 1 - alpha (layer=bn/syncbn get momentum = 1 - alpha).
    0.9 for BN/BRN, 0.98 when SMA statistics are used (MABN; appendix B.2)."""
    buffer_size: int = 16
    """m: SMA window length, counted in normalization groups (16 in the paper)."""
    eps: float = 1.0e-5
    """Added to the variance / chi^2 before the square root."""
    r_max: float = 5.0
    """lambda: the renormalization factor r is clipped to [1/r_max, r_max]."""
    d_max: float = 5.0
    """The renormalization shift d is clipped to [-d_max, d_max] (vanilla form only)."""
    warmup_iters: int = 0
    """Iterations that use batch statistics in both passes (and r = 1, d = 0)."""
    renorm_warmup_iters: int = 0
    """Iterations with r = 1, d = 0 (the authors' code: 100)."""
    ema_init: str = "first"
    """"first": the EMAs start at the first batch's value (authors' code); "torch": at mean 0,
    variance 1 as nn.BatchNorm2d."""
    num_groups: int = 32
    """Groups of nn.GroupNorm (layer=gn only)."""
    weight_centralization: bool = False
    """Convolve with kernels centred per output channel (eq. 18, mabn.CenConv2d) in EVERY conv,
    stem and shortcut projections included (Table 4's "Centralizing weights W")."""


@dataclass
class ModelConfig:
    """The network."""

    arch: str = "resnet18"
    """"resnet18" or "resnet50" (torchvision's; resnet50 is v1.5, stride in the 3x3 conv, as the
    authors' code), or the CIFAR-style "resnet8", "resnet14", "resnet20", "resnet32", "resnet56" for 32 px
    inputs (mabn.engine.models.CifarResNet: depth 6n + 2, n basic blocks per stage at widths
    16/32/64, 1x1 conv + BN shortcuts)."""
    small_input: bool = True
    """Stem for 32-64 px images: a 3x3 stride-1 convolution and no max-pool instead of the 7x7
    stride-2 convolution + max-pool of the ImageNet stem (torchvision archs only; the CIFAR-style
    ResNets always have the 3x3 stride-1 stem)."""
    num_classes: Optional[int] = None
    """Output classes; null = taken from the data (data.num_classes or the ImageFolder)."""
    zero_init_residual: bool = False
    """Zero-initialize the last gamma of each residual branch (not done in the paper)."""


@dataclass
class DataConfig:
    """Data sets, augmentation and loading."""

    name: str = "synthetic"
    """"imagenet" (root/train, root/val ImageFolders, 224 px), "imagefolder" (any such folder, e.g.
    ../shared/data/tiny-imagenet-10) or "synthetic" (generated, deterministic, learnable)."""
    root: Optional[str] = None
    """Folder holding the train/ and val/ ImageFolders (imagenet, imagefolder)."""
    train_dir: str = "train"
    """Training ImageFolder, relative to root."""
    val_dir: str = "val"
    """Validation ImageFolder (one sub-folder per class), relative to root."""
    batch_size: int = 32
    """Images per GPU / process per iteration (the paper's gradient batch B_g = 32)."""
    eval_batch_size: Optional[int] = None
    """Images per process per validation step; null = batch_size."""
    image_size: int = 16
    """Training crop and validation centre-crop size (224 for ImageNet)."""
    val_resize: Optional[int] = None
    """Shorter side before the validation centre crop; null = round(image_size * 256 / 224)."""
    augment: str = "fb"
    """Training augmentation: "fb" (fb.resnet.torch, the paper's: random-resized crop of
    min_crop_area-100%, colour jitter, PCA lighting, flip) or "crop_flip" (the CIFAR recipe: resize
    the image to image_size, random crop of image_size from it padded by crop_padding zeros,
    horizontal flip)."""
    crop_padding: int = 4
    """Zero padding on each side before the random crop of augment=crop_flip."""
    min_crop_area: float = 0.08
    """Smallest area fraction of RandomResizedCrop (fb.resnet.torch: 0.08; augment=fb)."""
    color_jitter: float = 0.4
    """Brightness, contrast and saturation jitter (fb.resnet.torch: 0.4; 0 disables; augment=fb)."""
    lighting: float = 0.1
    """Std of the AlexNet PCA lighting noise (fb.resnet.torch: 0.1; 0 disables; augment=fb)."""
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel mean subtracted after ToTensor (RGB)."""
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel std divided by after ToTensor (RGB)."""
    decoder: str = "tensor"
    """How ImageFolder images are decoded and augmented: "tensor" (torchvision.io.decode_image to a
    uint8 tensor, then torchvision.transforms.v2 and mabn.engine.data.PILColorJitter on tensors;
    PIL decodes where torchvision.io cannot) or "pil" (PIL images and torchvision.transforms).
    Both draw the same random numbers, so every sample gets the same crop, flip, jitter and
    lighting; only the antialiased resizes round differently (at most 1 level of 255). "tensor"
    is the faster. What differs and by how much, with the measurements: results/data_decoder.md.
    Synthetic data ignores it."""
    workers: int = 4
    """DataLoader worker processes per rank (0 = load in the main process)."""
    cache_images: bool = False
    """augment=crop_flip only: decode each image once, resize it to image_size and keep it in
    memory (the random crop and flip still run per sample), for small ImageFolders such as
    tiny-imagenet-10 (15 MB at 32 px). The cache lives in the process that loads: use workers=0,
    or it is rebuilt by the workers of every epoch."""
    pin_memory: bool = True
    """Pinned host memory for faster host-to-GPU copies (used on CUDA only)."""
    num_classes: int = 10
    """Classes of the synthetic data (ImageFolders count their sub-folders)."""
    train_size: int = 8192
    """Training images of the synthetic data."""
    val_size: int = 512
    """Validation images of the synthetic data."""
    noise: float = 4.0
    """Std of the per-image noise added to the class pattern of the synthetic data (higher is
    harder); the class patterns have std 1."""


@dataclass
class ScheduleConfig:
    """Length of training and the learning-rate schedule (iteration based)."""

    iterations: int = 300
    """Total training iterations (the paper: 600,000)."""
    policy: str = "step"
    """lr after the warm-up: "step" (multiplied by gamma after each milestone; the paper),
    "cosine" (half a cosine from lr down to 0 at the last iteration) or "linear" (straight down
    to 0; with a linear warm-up this is the one-cycle shape)."""
    milestones: List[int] = field(default_factory=lambda: [200, 260])
    """Iterations after which the lr is multiplied by gamma (the paper: 150k, 300k, 450k);
    policy=step only."""
    gamma: float = 0.1
    """Factor applied at each milestone (policy=step)."""
    warmup_iters: int = 0
    """Linear lr warm-up from warmup_factor x lr over this many iterations (0 = none, the paper)."""
    warmup_factor: float = 0.1
    """Starting fraction of the lr during warm-up."""
    log_every: int = 20
    """Iterations between training log lines / TensorBoard points."""
    eval_every: int = 100
    """Iterations between validations (0 = only at the end; there is always one at the end)."""
    ckpt_every: int = 100
    """Iterations between checkpoints (one is also written at the end and on interruption)."""


@dataclass
class OptimConfig:
    """SGD and the loss."""

    base_lr: float = 0.1
    """lr for a global batch of reference_batch images; the lr used is
    base_lr x (data.batch_size x world size) / reference_batch (0.1 x 256 / 256 in the paper)."""
    reference_batch: int = 256
    """Global batch at which the lr equals base_lr."""
    lr: Optional[float] = None
    """Explicit lr; overrides the scaling rule when set."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum (not in the paper)."""
    weight_decay: float = 1.0e-4
    """L2 weight decay."""
    decay_norm_and_bias: bool = True
    """Apply weight decay to normalization gamma/beta and biases as well (the paper: yes)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing (the authors' code uses 0.1; the paper does not mention it)."""


@dataclass
class StatsConfig:
    """Batch-statistics recording of Figures 2-4 (mabn.stats.StatisticsRecorder), on rank 0."""

    enabled: bool = False
    """Record the statistics; when false no hooks are attached and training costs nothing extra."""
    layers: List[str] = field(default_factory=lambda: ["layer1.0.bn1"])
    """Module names of the normalization layers to record (the paper: layer1.0.bn1)."""
    every: int = 10
    """Record on every k-th iteration (the cost is one float64 pass over the layer's input)."""
    small_batch_size: Optional[int] = None
    """Samples of the "small" batch; null = the layer's norm_batch_size, else 2."""


@dataclass
class DebugConfig:
    """Fault injection, used by the tests and to rehearse a cluster's pre-emption handling."""

    nan_loss_at: int = 0
    """Replace the loss of this iteration (1-based) by NaN; 0 = never."""
    fail_at: int = 0
    """Raise a RuntimeError in this iteration (1-based), after the forward pass, as a crash
    would (the run ends with status "failed"); 0 = never."""


@dataclass
class Config:
    """A whole training (or evaluation) run."""

    norm: NormConfig = field(default_factory=NormConfig)
    """Normalization layers (configs/norm/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Network (configs/model/)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data (configs/data/)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Iterations and lr schedule (configs/schedule/)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and loss (configs/optim/)."""
    stats: StatsConfig = field(default_factory=StatsConfig)
    """Batch-statistics recording (Figures 2-4): statistics.csv and TensorBoard statistics/..."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Fault injection."""
    name: str = "quickstart"
    """Run name (experiment presets set it to the table row)."""
    out_dir: str = "runs/quickstart"
    """Run directory: config, provenance, logs, TensorBoard events, metrics.json, checkpoints."""
    seed: int = 0
    """Seed of initialization, sampling and augmentation (the same on every rank)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    amp: str = "none"
    """Mixed precision (torch.autocast): "none", "bf16" or "fp16" (with loss scaling). Meant for
    CUDA; bf16 also runs on the CPU, fp16 is refused there at start (it would run ~90x slower)."""
    channels_last: bool = False
    """Use the channels_last memory format for the model and inputs."""
    compile: bool = False
    """Train through ``torch.compile(model)`` (its default backend, inductor), applied after
    channels_last and DDP. The first iteration of each invocation compiles (a minute or more for a
    ResNet on a CPU); its time is logged separately in log.txt ("torch.compile: ..."). Checkpoints
    hold the uncompiled model's state_dict (the same keys with or without compile, so either kind
    of run resumes the other) and validation runs the uncompiled model. Needs a working C++
    compiler on the CPU and Triton on CUDA, and is refused for a normalization that torch.compile
    is known to get wrong (mabn.engine.compiling.miscompiled_reason): checked at start, exit 2
    with a message otherwise. Not with stats.enabled=true."""
    resume: str = "none"
    """"none": start fresh (refused if out_dir already holds checkpoints); "auto": continue from
    the newest valid checkpoint in out_dir, or start fresh if there is none (refused when
    checkpoints exist but none is valid; nothing to do when metrics.json records the run as
    finished); or a checkpoint path. A resume is refused (exit 2, naming the keys) unless every
    setting that changes the result is the checkpoint's: every key but :data:`RESUME_FREE_KEYS`
    (schedule.iterations may grow under schedule.policy=step, never go below the checkpoint)."""
    stop_after: Optional[int] = None
    """End this invocation after this iteration with a checkpoint (status "interrupted"), e.g. to
    fit a job's time slice; resume=auto continues. null = run to schedule.iterations."""
    keep_checkpoints: int = 3
    """Checkpoints kept in out_dir/checkpoints: the most recently written ones (older ones are
    deleted)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""
    dry_run: bool = False
    """Validate, print the resolved config as one line "DRY-RUN <json>" and exit without any
    work: shows what a (multi)run would train, e.g. ``-m +study=table2 dry_run=true``."""


@dataclass
class EvalConfig(Config):
    """The command line of eval.py: every key of :class:`Config` (an override of the checkpoint's
    saved config, see eval.py) plus the two below."""

    ckpt: str = MISSING
    """Checkpoint to evaluate: a checkpoint file, or a run directory (its newest valid checkpoint,
    searched in <dir>/checkpoints)."""
    form: str = "trained"
    """How the model is evaluated: "trained" (as trained), "folded" (every normalization folded
    into its convolution, mabn.fold.fold_model) or "torchvision" (exported into a stock
    torchvision/CIFAR ResNet, mabn.fold.export_torchvision_state_dict); all give the same error."""


# ------------------------------------------------------------------------------------------------
# Loading and validation

def load(cfg: Any = None, schema: type = None, check=None) -> DictConfig:
    """Merge ``cfg`` (DictConfig, dict or None) onto the schema (:class:`Config`, or another
    task's, e.g. mabn.detection.config.DetectionConfig) and validate it (:func:`validate`, or
    ``check``).

    Returns a read-only typed DictConfig. Raises :class:`ConfigError` naming the key.
    """
    schema = OmegaConf.structured(schema or Config)
    try:
        merged = OmegaConf.merge(schema, cfg if cfg is not None else {})
        OmegaConf.resolve(merged)
    except Exception as e:  # omegaconf's ValidationError / ConfigKeyError name the key
        raise ConfigError(str(e).split("\n    full_key")[0] + _full_key(e)) from None
    merged.norm.layer = LEGACY_NORM_LAYERS.get(merged.norm.layer, merged.norm.layer)
    (check or validate)(merged)
    OmegaConf.set_readonly(merged, True)
    return merged


def _full_key(e: Exception) -> str:
    key = getattr(e, "full_key", None)
    return f" (key: {key})" if key else ""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(key: str, value, choices) -> None:
    _check(value in choices, f"{key}={value!r} is not one of {list(choices)}")


def _at_least(key: str, value, minimum) -> None:
    _check(value >= minimum, f"{key}={value} must be >= {minimum}")


def validate(cfg: DictConfig, task_groups=None) -> None:
    """Check every value that could make the run fail or be meaningless later, one config group
    at a time; no side effects beyond reading whether the data roots and out_dir exist. (What
    depends on the machine that runs it is checked by :func:`check_machine`.) The groups the
    task defines, model and data, are checked by ``task_groups(cfg)``: the classifier's
    :func:`validate_model` and :func:`validate_data` by default."""
    validate_norm(cfg.norm, cfg.model, cfg.data)
    (task_groups or _classifier_groups)(cfg)
    validate_schedule(cfg.schedule)
    validate_optim(cfg.optim)
    validate_stats(cfg.stats, cfg.compile)
    validate_debug(cfg.debug)
    validate_run(cfg)


def _classifier_groups(cfg: DictConfig) -> None:
    validate_model(cfg.model)
    validate_data(cfg.data)


def validate_norm(n, model, data) -> None:
    """norm: the value ranges are the layer's own (mabn.check_options), named as config keys;
    then what the layer needs of the model (GroupNorm's groups) and of the batch (whole groups)."""
    _one_of("norm.layer", n.layer, NORM_LAYERS)
    try:
        check_options(**{k: n[k] for k in LAYER_OPTIONS["batchstat"]})
    except OptionError as e:
        raise ConfigError(f"norm.{e}") from None
    _at_least("norm.num_groups", n.num_groups, 1)
    if n.layer == "gn" and model.arch in ARCHS:
        widths = channel_widths(model.arch)
        bad = [c for c in widths if c % n.num_groups]
        _check(not bad, f"norm.num_groups={n.num_groups} does not divide the {bad[:1]} channels of "
                        f"model.arch={model.arch} (its widths: {list(widths)})")
    if n.layer != "batchstat":
        _check(n.norm_batch_size is None,
               f"norm.norm_batch_size={n.norm_batch_size} needs norm.layer=batchstat "
               f"(norm.layer={n.layer} normalizes the whole batch); set it to null")
        family = {k: n[k] for k in ("form", "fp_stats", "bp_stats")}
        _check(family == {"form": "vanilla", "fp_stats": "batch", "bp_stats": "batch"},
               f"norm.form/fp_stats/bp_stats={list(family.values())} need norm.layer=batchstat "
               f"(norm.layer={n.layer})")
    if n.norm_batch_size is not None:
        _check(data.batch_size % n.norm_batch_size == 0,
               f"data.batch_size={data.batch_size} is not divisible by "
               f"norm.norm_batch_size={n.norm_batch_size}")


def validate_model(m) -> None:
    """model: a known architecture and at least 2 classes (when given)."""
    _one_of("model.arch", m.arch, ARCHS)
    _check(m.num_classes is None or m.num_classes >= 2, f"model.num_classes={m.num_classes} must be >= 2")


def validate_data(d) -> None:
    """data: sizes, augmentation and loading, then the data set itself (synthetic sizes, or the
    ImageFolder roots, which must exist)."""
    _one_of("data.name", d.name, ("imagenet", "imagefolder", "synthetic"))
    _at_least("data.batch_size", d.batch_size, 1)
    _check(d.eval_batch_size is None or d.eval_batch_size >= 1,
           f"data.eval_batch_size={d.eval_batch_size} must be >= 1")
    _at_least("data.image_size", d.image_size, 8)
    _check(d.val_resize is None or d.val_resize >= d.image_size,
           f"data.val_resize={d.val_resize} must be >= data.image_size={d.image_size}")
    _one_of("data.augment", d.augment, ("fb", "crop_flip"))
    _one_of("data.decoder", d.decoder, ("tensor", "pil"))
    _at_least("data.crop_padding", d.crop_padding, 0)
    _check(not d.cache_images or d.augment == "crop_flip",
           f"data.cache_images=true needs data.augment=crop_flip (data.augment={d.augment})")
    _check(not d.cache_images or d.val_resize == d.image_size,
           f"data.cache_images=true needs data.val_resize=data.image_size={d.image_size} (the cache holds "
           f"images resized to image_size; data.val_resize={d.val_resize})")
    _check(0 < d.min_crop_area <= 1, f"data.min_crop_area={d.min_crop_area} must be in (0, 1]")
    _at_least("data.color_jitter", d.color_jitter, 0)
    _at_least("data.lighting", d.lighting, 0)
    _check(len(d.mean) == 3 and len(d.std) == 3 and all(x > 0 for x in d.std),
           "data.mean and data.std must have 3 entries and data.std must be > 0")
    _at_least("data.workers", d.workers, 0)
    if d.name == "synthetic":
        _at_least("data.num_classes", d.num_classes, 2)
        _check(d.train_size >= d.batch_size, f"data.train_size={d.train_size} must be >= data.batch_size={d.batch_size}")
        _at_least("data.val_size", d.val_size, 1)
        _at_least("data.noise", d.noise, 0)
        return
    _check(d.root is not None and str(d.root) != "",
           f"data.root is required for data.name={d.name} (pass data.root=/path/to/{d.name})")
    for sub in ("train_dir", "val_dir"):
        path = os.path.join(d.root, d[sub])
        _check(os.path.isdir(path), f"data.root={d.root}: data.{sub} folder {path} does not exist")


def validate_schedule(s) -> None:
    """schedule: the length, the lr policy and its warm-up, and the cadences."""
    _at_least("schedule.iterations", s.iterations, 1)
    _one_of("schedule.policy", s.policy, ("step", "cosine", "linear"))
    _at_least("schedule.warmup_iters", s.warmup_iters, 0)
    _check(s.warmup_iters < s.iterations or s.warmup_iters == 0,
           f"schedule.warmup_iters={s.warmup_iters} must be below schedule.iterations={s.iterations}")
    ms = list(s.milestones)
    _check(s.policy != "step" or
           all(a < b for a, b in zip(ms, ms[1:])) and all(0 < x < s.iterations for x in ms),
           f"schedule.milestones={ms} must be increasing and inside (0, schedule.iterations={s.iterations})")
    _check(0 < s.gamma <= 1, f"schedule.gamma={s.gamma} must be in (0, 1]")
    _check(0 < s.warmup_factor <= 1, f"schedule.warmup_factor={s.warmup_factor} must be in (0, 1]")
    _at_least("schedule.log_every", s.log_every, 1)
    _at_least("schedule.ckpt_every", s.ckpt_every, 1)
    _at_least("schedule.eval_every", s.eval_every, 0)


def validate_optim(o) -> None:
    """optim: SGD's hyper-parameters and the loss."""
    _check(o.base_lr > 0, f"optim.base_lr={o.base_lr} must be > 0")
    _check(o.lr is None or o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _at_least("optim.reference_batch", o.reference_batch, 1)
    _check(0 <= o.momentum < 1, f"optim.momentum={o.momentum} must be in [0, 1)")
    _check(not o.nesterov or o.momentum > 0, "optim.nesterov=true needs optim.momentum > 0")
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _check(0 <= o.label_smoothing < 1, f"optim.label_smoothing={o.label_smoothing} must be in [0, 1)")


def validate_stats(st, compile_: bool) -> None:
    """stats: the recording cadence and layers; not inside a compiled model. (Whether the layers
    exist is known once the model is built: the trainer's set-up.)"""
    _check(not (compile_ and st.enabled),
           "compile=true does not support statistics recording (stats.enabled=true): the recorder's hooks "
           "would run inside the compiled model (not supported); use compile=false for a statistics run")
    _at_least("stats.every", st.every, 1)
    _check(len(st.layers) >= 1, "stats.layers must name at least one layer")
    _check(st.small_batch_size is None or st.small_batch_size >= 1,
           f"stats.small_batch_size={st.small_batch_size} must be >= 1")


def validate_debug(dbg) -> None:
    """debug: iterations of the injected faults (0 = never)."""
    _at_least("debug.nan_loss_at", dbg.nan_loss_at, 0)
    _at_least("debug.fail_at", dbg.fail_at, 0)


def validate_run(cfg) -> None:
    """The top-level keys: device and precision, resume and stop_after, checkpoints kept, out_dir."""
    _one_of("device", cfg.device, ("auto", "cpu", "cuda"))
    _one_of("amp", cfg.amp, ("none", "bf16", "fp16"))
    _check(cfg.resume in ("none", "auto") or os.path.isfile(cfg.resume),
           f"resume={cfg.resume!r} must be 'none', 'auto' or an existing checkpoint file")
    _check(cfg.stop_after is None or 1 <= cfg.stop_after <= cfg.schedule.iterations,
           f"stop_after={cfg.stop_after} must be in [1, schedule.iterations={cfg.schedule.iterations}]")
    _at_least("keep_checkpoints", cfg.keep_checkpoints, 1)
    _check(bool(cfg.out_dir), "out_dir must be set")
    _check(not os.path.exists(cfg.out_dir) or os.path.isdir(cfg.out_dir),
           f"out_dir={cfg.out_dir} is a file, not a directory")


def check_machine(cfg: DictConfig) -> None:
    """The checks that depend on the machine (done where the run or evaluation starts, not in
    :func:`validate`, so that a config can be composed and dry-run elsewhere): device=cuda, fp16
    and SyncBN need a GPU; compile=true needs a working torch.compile and a normalization it is
    not known to miscompile. (norm.layer=syncbn runs anywhere: on CUDA torch's nn.SyncBatchNorm,
    on the CPU mabn.SyncBatchNorm2d over gloo; one process normalizes its whole batch.)"""
    cuda = torch.cuda.is_available()
    on = device_type(cfg.device)
    _check(cfg.device != "cuda" or cuda, "device=cuda but no CUDA GPU is available; use device=cpu (or auto)")
    _check(cfg.amp != "fp16" or on == "cuda",
           "amp=fp16 needs a CUDA GPU (on the CPU it runs ~90x slower); use amp=bf16 or amp=none")
    if not cfg.compile:
        return
    reason = unavailable_reason(on)
    _check(not reason, f"compile=true, but torch.compile cannot run on this machine: {reason}; use compile=false")
    reason = miscompiled_reason(cfg.norm.layer)
    _check(not reason, f"compile=true with norm.layer={cfg.norm.layer}: {reason}; use compile=false")


def check_num_classes(model, data_classes: int, data_name: str) -> None:
    """model.num_classes, when given, must hold the classes the data set has (known once it is
    read: the trainer's set-up)."""
    _check(model.num_classes is None or model.num_classes >= data_classes,
           f"model.num_classes={model.num_classes} is below the {data_classes} classes of the data "
           f"({data_name}); set it to null or >= {data_classes}")


# ------------------------------------------------------------------------------------------------
# What a resume must repeat

#: The keys a resume may change, each with the reason it cannot change the result (a key ending
#: in "." covers its section). Every other key is the checkpoint's, or the resume is refused;
#: schedule.iterations has its own rule (see :func:`check_checkpoint_fits`). Changing one of these
#: is logged as a warning.
RESUME_FREE_KEYS = (
    ("out_dir", "where the run is kept: the same run, possibly moved"),
    ("resume", "how this invocation starts"),
    ("stop_after", "where this invocation stops; the next one continues from its checkpoint"),
    ("dry_run", "a dry run trains nothing"),
    ("name", "a label (progress bar, metrics.json); no computation reads it"),
    ("progress_bar", "display only"),
    ("keep_checkpoints", "how many checkpoint files stay on disk"),
    ("schedule.log_every", "logging cadence: the logged windows change, not the training (the open "
                           "window is in the checkpoint)"),
    ("schedule.eval_every", "validation cadence: validation runs the model in eval mode, which updates "
                            "no weight, buffer or random stream of training"),
    ("schedule.ckpt_every", "checkpoint cadence: a checkpoint is a copy of the state"),
    ("data.workers", "loader processes: each sample is augmented under its own seed"),
    ("data.pin_memory", "host memory kind of the batches"),
    ("data.cache_images", "keeps the same resized images in memory instead of decoding them again"),
    ("data.eval_batch_size", "validation batching: in eval mode each image is normalized with the running "
                             "statistics, whatever its batch"),
    ("device", "where the same computation runs, as the world size (a resume on other hardware is "
               "not bit-identical: floating-point rounding differs)"),
    ("channels_last", "the memory layout of the same computation (rounding differs, as with device)"),
    ("compile", "torch.compile runs the same model (checkpoints hold the uncompiled keys; rounding differs)"),
    ("stats.", "statistics recording observes the layers and changes nothing they compute"),
    ("debug.", "fault injection: a fault at iteration j ends its invocation before any checkpoint at "
               "or after j, so the checkpoint is the same with or without it (rehearsing a crash and "
               "its resume needs the resume without the fault)"),
)
#: The keys that define the model a checkpoint's weights belong to (eval.py may change any other).
MODEL_KEYS = ("model.", "norm.")
#: Config keys renamed since checkpoints were first written: old dotted key -> new one (the same
#: quantity). norm.momentum always held the paper's alpha (the weight of the old value).
RENAMED_KEYS = {"norm.momentum": "norm.alpha"}
#: Values renamed since: dotted key -> {old value: new value}.
RENAMED_VALUES = {"norm.layer": LEGACY_NORM_LAYERS}


def _covered(key: str, prefixes) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def upgrade_saved_config(saved: dict) -> DictConfig:
    """The (mutable) config a checkpoint was trained with, with renamed keys and values brought
    up to date (:data:`RENAMED_KEYS`, :data:`RENAMED_VALUES`)."""
    cfg = OmegaConf.create(saved)
    for old, new in RENAMED_KEYS.items():
        parent, _, leaf = old.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node:
            value = node.pop(leaf)
            if OmegaConf.select(cfg, new) is None:
                OmegaConf.update(cfg, new, value, merge=False)
    for key, renames in RENAMED_VALUES.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value in renames:
            OmegaConf.update(cfg, key, renames[value], merge=False)
    return cfg


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def config_changes(saved: dict, cfg) -> tuple[dict[str, tuple], list[str]]:
    """({flattened key: (the checkpoint's value, this config's value)} for every key both hold
    with different values; the keys this config has and the checkpoint's config lacks (written
    before those keys existed: they cannot be compared)). ``saved`` is a checkpoint's config."""
    old = dict(_flat(OmegaConf.to_container(upgrade_saved_config(saved), resolve=True)))
    new = dict(_flat(OmegaConf.to_container(cfg, resolve=True)))
    changes = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
    return changes, sorted(new.keys() - old.keys())


def check_checkpoint_fits(saved: dict, cfg, iteration: int, source: str, scope: str = "resume") -> list[str]:
    """Refuse (:class:`ConfigError`, one line naming every key) a checkpoint of ``iteration``,
    trained with the config ``saved``, that ``cfg`` would not continue as the same run.

    Keys of ``norm`` that the configured layer does not read (:func:`unused_norm_keys`, e.g.
    norm.num_groups of a batch-statistics layer) are not compared.
    ``scope="resume"`` (training): every key but :data:`RESUME_FREE_KEYS` must be the checkpoint's,
    except schedule.iterations, which may grow when the lr of every iteration done stays the same
    (schedule.policy=step: the lr does not depend on the length) and never goes below
    ``iteration``. ``scope="model"`` (eval.py): only :data:`MODEL_KEYS`, the model the weights
    belong to. ``source`` names the checkpoint in the message. Returns the keys the checkpoint's
    config lacks (not checked; the caller warns)."""
    changes, unchecked = config_changes(saved, cfg)
    changes = {k: v for k, v in changes.items() if k not in unused_norm_keys(cfg)}
    if scope == "model":
        bad = {k: v for k, v in changes.items() if _covered(k, MODEL_KEYS)}
        advice = "evaluate it with the settings it was trained with"
    else:
        bad = {k: v for k, v in changes.items()
               if not _covered(k, [key for key, _ in RESUME_FREE_KEYS]) and k != "schedule.iterations"}
        advice = ("resume with the checkpoint's settings (only those in mabn.engine.config.RESUME_FREE_KEYS "
                  "may differ) or choose another out_dir")
    shown = [f"{k}={new!r} (the checkpoint's: {old!r})" for k, (old, new) in bad.items()]
    if scope == "resume":
        shown += _iterations_misfit(cfg.schedule, changes.get("schedule.iterations"), iteration)
    _check(not shown, f"{source} (iteration {iteration}) does not fit this config: {'; '.join(shown)}; {advice}")
    return unchecked


def unused_norm_keys(cfg) -> set[str]:
    """The ``norm.*`` keys that ``cfg.norm.layer`` does not read (``mabn.LAYER_OPTIONS``: e.g.
    norm.num_groups of layer=batchstat, norm.buffer_size of layer=gn): they cannot change what is
    built, so a resume or an evaluation may differ in them."""
    used = {"layer", "weight_centralization", *LAYER_OPTIONS[cfg.norm.layer]}
    return {f"norm.{k}" for k in cfg.norm if k not in used}


def _iterations_misfit(schedule, change: tuple | None, iteration: int) -> list[str]:
    """Why schedule.iterations cannot be continued from ``iteration`` (empty when it can)."""
    if schedule.iterations < iteration:
        return [f"schedule.iterations={schedule.iterations} is below the checkpoint's iteration {iteration} "
                f"(a resume cannot go back)"]
    if change is not None and schedule.policy != "step":
        return [f"schedule.iterations={schedule.iterations} (the checkpoint's: {change[0]}): with "
                f"schedule.policy={schedule.policy} the lr of every iteration depends on it"]
    return []
