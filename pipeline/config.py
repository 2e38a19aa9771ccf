"""Settings of every stage, and the choices of every string option: plain dataclasses without torch, so the CLI
builds its options (defaults, choices) from them and starts fast. Each validates its values when made."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import GenddError, require, require_choice


@dataclass(frozen=True)
class MethodSpec:
    """What a distillation method reads and trains, and the module holding its loss (`LOSSES[name]`), imported only
    when the method runs: the teacher's training never loads GenDD's head."""

    supervised: bool  # trains on labels: the data must have them
    uses_cache: bool  # reads the teacher's cached features or logits
    uses_head: bool  # trains the generative head on the teacher's features (GenDD)
    probe: str  # what trains the student's own classifier: labels (ce), KD, or the teacher's softmax alone (kl)
    module: str = "pipeline.train.losses"  # GenDD's: pipeline.distill.objectives (its head, targets, losses)


GENDD = "pipeline.distill.objectives"
# The one table of methods: the CLI's choices, the data each needs, the modules it trains.
METHOD_SPECS = {
    "ce": MethodSpec(supervised=True, uses_cache=False, uses_head=False, probe="ce"),
    "kd": MethodSpec(supervised=True, uses_cache=True, uses_head=False, probe="kd"),
    "kl": MethodSpec(supervised=False, uses_cache=True, uses_head=False, probe="kl"),
    "gendd": MethodSpec(supervised=True, uses_cache=True, uses_head=True, probe="ce", module=GENDD),
    "gendd_unsup": MethodSpec(supervised=False, uses_cache=True, uses_head=True, probe="kl", module=GENDD),
}
METHODS = tuple(METHOD_SPECS)
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SAMPLERS = ("ddpm", "ddim", "dpmsolver")
REFIT_SAMPLES = 50_000  # train samples a refit probe fits on by default (their features are held: N x D_S float32)
SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep_spacing; the official code's is linspace
POLICIES = ("rrc", "pad_crop", "flip", "none")
DATA_MODES = ("auto", "memory", "stream")
CODECS = ("zstd", "lz4", "none", "bf16", "int8")
FORMATS = ("zarr", "webdataset")
MIXED_PRECISION = ("no", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")

# Learning rate per method when none is given: the best of a sweep (0.002-0.032) on the Fashion-MNIST holdout
# (10 000 training images, test_resnet from a resnet18 teacher, 10 epochs, batch 128, 2 CPU cores; docs/tuning.md),
# except GenDD's: its holdout best, 0.008 (probe 87.88 against 87.39 at 0.004), fails on the embedded digits with
# test_efficientnet at batch 64 (val probe 74.2 / 66.4 for gendd / gendd_unsup, against 97.5 / 93.6 at 0.004).
TUNED_LR = {"gendd": 0.004, "gendd_unsup": 0.004, "kd": 0.032, "ce": 0.016, "kl": 0.016}


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which loss to train with and its hyper-parameters."""

    method: str = "gendd"
    contraction: float = 0.9  # lam of Distribution Contraction; forced to 0 for unsupervised methods
    mixup_beta: float = 1.0  # <= 0 turns feature mixup off
    kd_alpha: float = 1.0
    kd_tau: float = 4.0
    # Logit adjustment (Menon et al. 2021) of every cross-entropy on labels (ce, kd, GenDD's probe): train on
    # logits + tau * log(prior) and predict with the plain logits, which targets balanced accuracy on long-tailed data.
    logit_adjust: float = 0.0
    # Contraction anchor (the official ImageNet recipe): (a * onehot(y) + (1 - a) * softmax(teacher logits)) @ W;
    # 1 = the hard anchor W[y] (the paper's CIFAR recipe).
    soft_anchor: float = 1.0

    def __post_init__(self) -> None:
        require_choice("method", self.method, METHODS)
        if not self.spec.supervised:
            # Contraction pulls towards the labels' class centres, which an unsupervised method never sees.
            object.__setattr__(self, "contraction", 0.0)
        require(0.0 <= self.contraction <= 1.0, "contraction", "in [0, 1]", self.contraction)
        require(self.kd_tau > 0, "kd_tau", "positive", self.kd_tau)
        if not self.logit_adjust >= 0:  # named as in the library (the objective's own field)
            raise GenddError(f"logit_adjust must be >= 0 (0 = plain cross-entropy), got {self.logit_adjust}")
        require(self.mixup_beta >= 0, "mixup_beta", ">= 0 (0 = off)", self.mixup_beta)
        require(self.kd_alpha >= 0, "kd_alpha", ">= 0", self.kd_alpha)
        require(0.0 <= self.soft_anchor <= 1.0, "soft_anchor", "in [0, 1] (1 = the hard anchor W[y])", self.soft_anchor)

    @property
    def spec(self) -> MethodSpec:
        """What the method reads and trains."""
        return METHOD_SPECS[self.method]


@dataclass(frozen=True)
class ViewPolicy:
    """How views 1..K-1 are drawn: random-resized-crop (`rrc`), pad-and-crop, flip only, or none (identity)."""

    kind: str = "rrc"
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: int = 2  # pad_crop: pixels of (zero) padding on each side, as in CIFAR's pad-4-crop-32
    flip: bool = True

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise GenddError(f"view policy {self.kind!r} is unknown; choose one of {', '.join(POLICIES)}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
            raise GenddError(f"view policy scale {self.scale} / ratio {self.ratio} out of range (0 < lo <= hi)")

    def to_dict(self) -> dict:
        """JSON-friendly form, stored in caches so readers can check they replay the same policy."""
        return {**asdict(self), "scale": list(self.scale), "ratio": list(self.ratio)}

    @classmethod
    def from_dict(cls, raw: dict) -> ViewPolicy:
        """Inverse of `to_dict`."""
        return cls(
            **{**raw, "scale": tuple(raw.get("scale", (0.35, 1.0))), "ratio": tuple(raw.get("ratio", (0.75, 4 / 3)))}
        )


@dataclass(frozen=True)
class DataOptions:
    """How training input is read: mode, loader workers and the stream's shuffle buffer."""

    mode: str = "auto"
    workers: int = -1  # stream loader processes; -1 = auto (one per spare core, up to 8)
    shuffle_buffer: int = 4096  # samples a stream worker shuffles among (memory ~ buffer x one decoded sample)

    def __post_init__(self) -> None:
        if self.mode not in DATA_MODES:
            raise GenddError(f"--data {self.mode!r} is unknown: choose one of {', '.join(DATA_MODES)}")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", ">= 0", self.shuffle_buffer)
        require(self.workers >= -1, "workers", ">= 0, or -1 for auto", self.workers)


@dataclass(frozen=True)
class HeadSettings:
    """The generative head's chosen settings (HeadConfig adds the feature sizes the data fixes) and its learning rate
    multiplier; each field is named as in HeadConfig."""

    token_dim: int = 64  # Split Tokenization: teacher dims per token
    width: int = 256  # the paper's head is 1024 wide
    depth: int = 3
    diffusion_batch_mul: int = 2  # noise draws per (sample, token); 8 gains ~0.5 points at 3.5x the CPU step time
    cond_dropout: float = 0.2
    prediction: str = "v_prediction"  # what the head predicts: v (tuned default), epsilon (paper) or sample
    lr_mult: float = 2.5  # head + probe learning rate over the backbone's (1.0 = the paper's single lr)
    target_norm: bool = True  # standardise diffusion targets per dimension (False = the paper's raw targets)
    # Training timesteps t = T * u ** timestep_power, u ~ U(0, 1): 1 = uniform (the paper); < 1 draws more high-noise
    # steps, where only the student's condition tells the target.
    timestep_power: float = 1.0
    # The official head's learned variance: twice the outputs, the second half interpolating log beta_t and the
    # posterior's log variance, trained by the variational bound (mean detached) beside the MSE; DDPM sampling uses it.
    learn_sigma: bool = False
    # GenDD's probe reads the head's normalised condition z (detached) instead of the raw student feature; the
    # timm-only load_student.py cannot rebuild that readout (gendd evaluate can).
    probe_on_condition: bool = False

    def __post_init__(self) -> None:
        # Messages name the CLI option of each field (params.yaml's key): --head-width, not --width.
        options = {
            "token_dim": "token_dim",
            "width": "head_width",
            "depth": "head_depth",
            "diffusion_batch_mul": "diffusion_batch_mul",
        }
        for name, option in options.items():
            require(getattr(self, name) >= 1, option, ">= 1", getattr(self, name))
        require(0 <= self.cond_dropout < 1, "cond_dropout", "in [0, 1)", self.cond_dropout)
        require(self.lr_mult > 0, "head_lr_mult", "positive", self.lr_mult)
        require(0 < self.timestep_power <= 10, "timestep_power", "in (0, 10] (1 = uniform)", self.timestep_power)
        require_choice("head_prediction", self.prediction, PREDICTIONS)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When training writes a checkpoint within an epoch (one is always written at each epoch's end). Saving never
    changes what a run computes, so none of this is part of a run's fingerprint: changing it keeps a checkpoint."""

    every_steps: int = 0  # after every N-th optimiser step of an epoch (0 = not by step count)
    # After the first step that ends more than M minutes after the previous checkpoint (0 = not by time): a crash
    # loses minutes, not an epoch, at any step time.
    every_minutes: float = 5.0

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, "checkpoint_every", ">= 0 (0 = only at epoch ends)", self.every_steps)
        require(
            math.isfinite(self.every_minutes) and self.every_minutes >= 0,
            "checkpoint_minutes",
            ">= 0 (0 = not by time)",
            self.every_minutes,
        )


# TrainConfig fields a checkpoint does not have to match: a resumed run may be extended, and when it saves is free.
_RESUMABLE_CHANGES = ("epochs", "checkpoints")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (its hash guards resumption)."""

    model: str = "resnet10t"
    small_stem: bool = True
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None  # None: the method's tuned learning rate (TUNED_LR)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    beta2_start: float = 0.95
    beta2_end: float = 0.999
    warmstart_epochs: int = 0  # the first epochs of `epochs` (generative methods only): stage-1 warm start
    # The warm start as its own stage before the `epochs` budget, with its own warm-up and cosine (the official
    # recipes run it as a separate run); False: its epochs are the first of `epochs`.
    warmstart_before: bool = False
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # the method is objective.method
    head: HeadSettings = field(default_factory=HeadSettings)  # used by the generative methods only
    input_size: int | None = None  # default: the teacher's input size (or the images' size)
    policy: ViewPolicy = field(default_factory=ViewPolicy)  # augmentation when training without a cache
    seed: int = 0
    mixed_precision: str = "no"
    cpu: bool = False
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)  # not part of the fingerprint

    def __post_init__(self) -> None:
        """Every setting in range before any work (the CLI passes options through unchanged)."""
        if self.lr is None:
            object.__setattr__(self, "lr", TUNED_LR[self.objective.method])
        require(self.epochs >= 1, "epochs", ">= 1", self.epochs)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number", self.lr)
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(
            0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"in [0, epochs={self.epochs}]", self.warmup_epochs
        )
        if self.warmstart_before:
            require(
                self.warmstart_epochs >= 1, "warmstart_epochs", ">= 1 with --warmstart-before", self.warmstart_epochs
            )
        else:
            require(
                0 <= self.warmstart_epochs < self.epochs,
                "warmstart_epochs",
                f"in [0, epochs={self.epochs}) (the warm start is the first epochs of the run)",
                self.warmstart_epochs,
            )
        require(self.input_size is None or self.input_size >= 1, "input_size", ">= 1", self.input_size)
        require_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)

    @property
    def total_epochs(self) -> int:
        """Epochs the run trains: `epochs`, plus the warm start when it runs before the budget."""
        return self.epochs + (self.warmstart_epochs if self.warmstart_before else 0)

    def fingerprint(self) -> str:
        """Stable text of the settings that must match to resume a checkpoint (not `epochs`: a resumed run may be
        extended; not the checkpoint policy: saving changes no result)."""
        settings = {k: v for k, v in asdict(self).items() if k not in _RESUMABLE_CHANGES}
        return json.dumps(settings, sort_keys=True, default=str)


@dataclass(frozen=True)
class SamplingConfig:
    """How the generative path draws teacher features: sampler, steps, guidance scale, samples averaged."""

    sampler: str = "ddim"
    steps: int = 25
    cfg_scale: float = 2.0
    n_samples: int = 5
    seed: int = 0
    # Which timesteps a short schedule visits: leading (10 steps: 900, 800, ..., 0), trailing (999, 899, ..., 99) or
    # linspace (999 ... 0, both ends; the official code's). Starting at 999 suits v- and x0-prediction; leading
    # skips the cosine schedule's last steps, where an epsilon head's x0 estimate (x - sigma * eps) / alpha blows up.
    spacing: str = "leading"

    def __post_init__(self) -> None:
        require_choice("sampler", self.sampler, SAMPLERS)
        require_choice("spacing", self.spacing, SPACINGS)
        require(self.steps >= 1, "steps", ">= 1", self.steps)
        require(math.isfinite(self.cfg_scale) and self.cfg_scale >= 0, "cfg_scale", ">= 0 (1 = none)", self.cfg_scale)
        require(self.n_samples >= 1, "n_samples", ">= 1", self.n_samples)


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract, with which teacher, views and storage."""

    shards: str | Path  # a local directory or a URL
    teacher: Path
    out: str | Path  # a local directory, or an s3:// or gs:// prefix
    splits: tuple[str, ...] = ("train", "val")
    num_views: int = 8
    eval_views: int = 1  # views cached for splits other than train (the identity is enough to evaluate)
    policy: ViewPolicy = field(default_factory=ViewPolicy)
    seed: int = 0
    batch_size: int = 512
    codec: str = "zstd"
    fmt: str = "zarr"
    mixed_precision: str = "no"
    cpu: bool = False
    workers: int = -1  # shard-decode processes; 0 = one thread; -1 = auto (processes only where cores are spare)

    def __post_init__(self) -> None:
        """Options in range before anything is written (a `--views 0` leaves nothing behind)."""
        require(len(self.splits) > 0, "splits", "at least one split name", ",".join(self.splits))
        require(self.num_views >= 1, "views", ">= 1 (view 0 is the plain image)", self.num_views)
        require(self.eval_views >= 1, "eval_views", ">= 1", self.eval_views)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.workers >= -1, "workers", ">= 0, or -1 for auto", self.workers)
        require_choice("codec", self.codec, CODECS)
        require_choice("format", self.fmt, FORMATS)
        require_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
