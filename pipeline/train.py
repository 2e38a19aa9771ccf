"""Training loop for students (and the teacher): in-memory batches, replayed views, accelerate, resumable epochs."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.errors import GenddError
from pipeline.head import GenerativeHead, HeadConfig
from pipeline.models import create_model, feature_dim, features
from pipeline.objectives import (
    SUPERVISED,
    USES_HEAD,
    ObjectiveConfig,
    class_log_prior,
    compute_objective,
    contract_targets,
    kl_loss,
    warmstart_loss,
)
from pipeline.shards import ShardData, load_index, load_split
from pipeline.views import ViewPolicy, apply_views, sample_views


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (its hash guards resumption)."""

    model: str = "resnet10t"
    small_stem: bool = True
    method: str = "gendd"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    beta2_start: float = 0.95
    beta2_end: float = 0.999
    warmstart_epochs: int = 0  # the first epochs of `epochs` (generative methods only): stage-1 warm start
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig("gendd"))
    head_token_dim: int = 64
    head_width: int = 1024
    head_depth: int = 3
    diffusion_batch_mul: int = 4
    cond_dropout: float = 0.2
    head_lr_mult: float = 2.5  # head + probe learning rate over the backbone's (1.0 = the paper's single lr)
    target_norm: bool = True  # standardise diffusion targets per dimension (False = the paper's raw targets)
    head_prediction: str = "v_prediction"  # what the head predicts: v (tuned default), epsilon (paper) or sample
    input_size: int | None = None  # default: the teacher's input size (or the images' size)
    policy: ViewPolicy = field(default_factory=ViewPolicy)  # augmentation when training without a cache
    seed: int = 0
    mixed_precision: str = "no"
    cpu: bool = False

    def fingerprint(self) -> str:
        """Stable text of the settings, stored in checkpoints."""
        return json.dumps(asdict(self), sort_keys=True, default=str)


@dataclass
class TrainData:
    """What one epoch draws from: uint8 images, labels, and cached teacher outputs per (sample, view) if any."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64, -1 = none
    mean: tuple[float, ...]
    std: tuple[float, ...]
    views: torch.Tensor | None = None  # (N, K, 5) cached views; None -> fresh views from the policy each epoch
    features: torch.Tensor | None = None  # (N, K, D_T)
    logits: torch.Tensor | None = None  # (N, K, C)
    head_weight: torch.Tensor | None = None  # (C, D_T): class centres of Distribution Contraction
    head_bias: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    labeled: bool | None = None  # every sample labelled (set by targets_to; None: checked per batch)


# Per-sample targets on the device may take this share of its free memory; more stays in pinned host memory.
DEVICE_TARGET_SHARE = 0.25


def targets_to(data: TrainData, device: torch.device) -> TrainData:
    """The data with its per-sample targets (labels, views, teacher outputs) where the training steps gather them.

    On a GPU they move to the device when they fit in DEVICE_TARGET_SHARE of its free memory: a copy from pageable
    host memory synchronises the stream, so gathering on the host and copying every step stalls the queue (small
    students are launch-bound). Otherwise they stay in pinned host memory, whose copies are asynchronous.
    """
    per_sample = [data.labels, data.views, data.features, data.logits]
    labeled = bool((data.labels >= 0).all())
    if device.type != "cuda":
        return replace(data, labeled=labeled)
    nbytes = sum(t.numel() * t.element_size() for t in per_sample if t is not None)
    free, _ = torch.cuda.mem_get_info(device)
    move = (lambda t: t.to(device)) if nbytes <= DEVICE_TARGET_SHARE * free else (lambda t: t.pin_memory())
    moved = {
        name: move(getattr(data, name))
        for name in ("labels", "views", "features", "logits", "head_weight", "head_bias")
        if getattr(data, name) is not None
    }
    return replace(data, **moved, labeled=labeled)


def load_train_data(shards: str | Path, cache: str | Path | None, split: str = "train") -> TrainData:
    """Shards of a split held in memory, joined with the feature cache when one is given."""
    from pipeline.store import open_cache

    index = load_index(shards)
    data: ShardData = load_split(index.split(split))
    out = TrainData(data.images, data.labels, tuple(index.spec["mean"]), tuple(index.spec["std"]), keys=data.keys)
    if cache is None:
        return out
    store = open_cache(cache, split, spec_hash=index.spec_hash)
    if store.keys != data.keys:
        raise GenddError(f"cache {cache} was extracted from other samples than {shards}; re-run gendd extract")
    arrays = store.load_all()
    out.views = torch.from_numpy(arrays["views"])
    out.features = torch.from_numpy(arrays["features"])
    out.logits = torch.from_numpy(arrays["logits"])
    out.head_weight = torch.from_numpy(np.asarray(store.head_weight, dtype=np.float32))
    out.head_bias = torch.from_numpy(np.asarray(store.head_bias, dtype=np.float32))
    return out


class Student(nn.Module):
    """A timm network (its own classifier is the linear probe), plus the generative head and warm-start projection."""

    def __init__(
        self, net: nn.Module, head: GenerativeHead | None, proj: nn.Module | None, log_prior: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.net, self.head, self.proj = net, head, proj
        self.log_prior: torch.Tensor | None
        # Training-label class prior for logit adjustment; a buffer so it follows the model to its device.
        self.register_buffer("log_prior", log_prior, persistent=log_prior is not None)

    def forward(
        self, x: torch.Tensor, batch: dict, objective: ObjectiveConfig, warm: bool
    ) -> tuple[torch.Tensor, dict]:
        """Loss of one batch; everything runs inside forward so DDP sees every parameter it trains."""
        feats = features(self.net, x)  # (B, D_S)
        if warm:
            if "labels" in batch:
                loss = warmstart_loss(feats, self.proj, batch["head_weight"], batch["head_bias"], batch["labels"])
            else:  # unlabeled data: match the teacher's softmax through its frozen head instead of labels
                logits = self.proj(feats) @ batch["head_weight"].T + batch["head_bias"]
                loss = kl_loss(logits, batch["teacher_logits"])
            return loss, {"loss": loss.detach(), "warmstart": loss.detach()}
        return compute_objective(
            objective,
            feats=feats,
            classifier=self.net.get_classifier(),
            head=self.head,
            teacher_features=batch.get("teacher_features"),
            teacher_logits=batch.get("teacher_logits"),
            labels=batch.get("labels"),
            centres=batch.get("head_weight"),
            log_prior=self.log_prior,
        )


def build_student(cfg: TrainConfig, data: TrainData, input_size: int) -> Student:
    """The student network with the modules its method needs."""
    num_classes = 0 if data.head_weight is None else data.head_weight.shape[0]
    num_classes = num_classes or int(data.labels.max()) + 1
    net = create_model(cfg.model, num_classes, data.images.shape[1], cfg.small_stem)
    d_s = feature_dim(net, data.images.shape[1], input_size)
    head = proj = None
    if cfg.method in USES_HEAD:
        if data.features is None:
            raise GenddError(f"method {cfg.method} (or a warm start) needs a teacher feature cache: pass --cache")
        d_t = data.features.shape[-1]
        if cfg.method in USES_HEAD:
            head_cfg = HeadConfig(
                d_t,
                d_s,
                cfg.head_token_dim,
                cfg.head_width,
                cfg.head_depth,
                diffusion_batch_mul=cfg.diffusion_batch_mul,
                cond_dropout=cfg.cond_dropout,
                prediction=cfg.head_prediction,
            )
            head = GenerativeHead(head_cfg)
            if cfg.target_norm:
                head.set_target_stats(*target_stats(cfg, data))
        if cfg.warmstart_epochs:
            proj = nn.Linear(d_s, d_t)  # stage 1: student feature -> teacher feature space -> frozen teacher head
    log_prior = class_log_prior(data.labels, num_classes) if cfg.objective.logit_adjust else None
    return Student(net, head, proj, log_prior)


def target_stats(cfg: TrainConfig, data: TrainData) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean/std of the contracted targets over every cached (sample, view)."""
    n, k, d = data.features.shape
    labels = data.labels.repeat_interleave(k) if cfg.objective.contraction > 0 else None
    targets = contract_targets(
        data.features.reshape(n * k, d).float(), labels, data.head_weight, cfg.objective.contraction
    )
    std = targets.std(dim=0)
    return targets.mean(dim=0), std.clamp_min(0.1 * float(std.median()))  # floor: near-dead dims would blow up


def check_data_serves(cfg: TrainConfig, data: TrainData) -> None:
    """Refuse, in one line, a data/cache combination the method cannot use."""
    labeled = bool((data.labels >= 0).all())
    if cfg.method in SUPERVISED and not labeled:
        raise GenddError(f"method {cfg.method} needs labels but the data has none; use kl or gendd_unsup")
    if cfg.method != "ce" and data.features is None:
        raise GenddError(f"method {cfg.method} needs the teacher feature cache: pass --cache (run gendd extract)")
    if data.features is not None and data.views is None:
        raise GenddError("the cache holds no views to replay; re-run gendd extract")
    if cfg.objective.logit_adjust and cfg.method not in SUPERVISED:
        raise GenddError(f"logit_adjust shifts the label cross-entropy, which {cfg.method} has none of; set it to 0")
    if cfg.warmstart_epochs and not 0 <= cfg.warmstart_epochs < cfg.epochs:
        raise GenddError(f"warmstart_epochs ({cfg.warmstart_epochs}) must be fewer than epochs ({cfg.epochs})")


def param_groups(model: Student, weight_decay: float, head_lr_mult: float = 1.0) -> list[dict]:
    """Official grouping (decay on backbone weight matrices; none on norms and biases), plus a group for the
    generative head and the detached linear probe: no decay, lr x head_lr_mult (they start from scratch and must
    converge within a short budget; the probe never feeds gradient to the backbone)."""
    fast = {id(p) for p in model.head.parameters()} if model.head is not None else set()
    if model.head is not None:
        fast |= {id(p) for p in model.net.get_classifier().parameters()}
    groups = {"decay": [], "no_decay": [], "head": []}
    for param in model.parameters():
        if param.requires_grad:
            groups["head" if id(param) in fast else "decay" if param.ndim > 1 else "no_decay"].append(param)
    return [
        {"params": groups["decay"], "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": groups["no_decay"], "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": groups["head"], "weight_decay": 0.0, "lr_mult": head_lr_mult},
    ]


def schedule(step: int, total: int, warmup: int, cfg: TrainConfig) -> tuple[float, float]:
    """(lr, beta2) at a step: linear warm-up then cosine decay; beta2 ramps 0.95 -> 0.999 along a cosine."""
    progress = step / max(total, 1)
    lr = (
        cfg.lr * (step + 1) / warmup
        if step < warmup
        else cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    )
    beta2 = cfg.beta2_end - (cfg.beta2_end - cfg.beta2_start) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr, beta2


def epoch_plan(
    cfg: TrainConfig, data: TrainData, epoch: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's sample order and the view index per sample for one epoch, from (seed, epoch) only."""
    n = len(data.labels)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    k = data.views.shape[1] if data.views is not None else 1
    view_index = torch.randint(k, (n,), generator=gen)
    usable = (n // world) * world  # every rank gets the same number of steps
    return order[:usable][rank::world], view_index


def epoch_views(cfg: TrainConfig, data: TrainData, epoch: int, view_index: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 5) views for an epoch: the cached view picked per sample, or fresh policy draws without a cache."""
    if data.views is not None:
        where = data.views.device
        return data.views[torch.arange(len(view_index), device=where), view_index.to(where)]
    fresh = sample_views(data.keys, 2, cfg.policy, seed=cfg.seed * 100_003 + epoch, image_size=size)
    return torch.from_numpy(fresh[:, 1])


def _batch(data: TrainData, idx: torch.Tensor, view_index: torch.Tensor, device: torch.device) -> dict:
    """Targets of a batch on the device: labels and the cached teacher outputs of the chosen views.

    The gathers run where the targets live (see `targets_to`); idx and view_index are moved there if needed.
    """
    src = data.labels.device
    idx, view_index = idx.to(src), view_index.to(src)
    batch: dict = {"head_weight": data.head_weight, "head_bias": data.head_bias}
    labeled = data.labeled  # settled once by targets_to: no device sync per step
    if labeled is None:  # data not placed by targets_to: check this batch on the host
        labeled = bool((data.labels[idx] >= 0).all())
    if labeled:
        batch["labels"] = data.labels[idx]
    if data.features is not None:
        picked = view_index[idx]
        batch["teacher_features"] = data.features[idx, picked].float()
        batch["teacher_logits"] = data.logits[idx, picked].float()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if v is not None}


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous epoch's checkpoint intact


def _load_checkpoint(path: Path, cfg: TrainConfig, resume: bool) -> dict | None:
    if not resume or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["fingerprint"] != cfg.fingerprint():
        raise GenddError(f"{path} was written with other settings; delete it (or the output dir) or pass --no-resume")
    return state


@dataclass
class _Run:
    """What one training run carries from epoch to epoch."""

    accelerator: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: TrainData  # its targets where the steps gather them (targets_to)
    images: torch.Tensor  # (N, C, H, W) uint8, on the device
    steps_per_epoch: int
    total_steps: int
    warmup: int
    has_proj: bool


def _start_run(cfg: TrainConfig, data: TrainData, input_size: int, ckpt_path: Path, resume: bool):
    """Build model and optimizer, restore a checkpoint if one matches; returns (run, first epoch, history)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # With a warm start, the head idles in stage 1 and the projection afterwards: DDP must allow unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.warmstart_epochs > 0)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, kwargs_handlers=[ddp])
    torch.manual_seed(cfg.seed)
    model = build_student(cfg, data, input_size)
    groups = param_groups(model, cfg.weight_decay, cfg.head_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2_start))
    state = _load_checkpoint(ckpt_path, cfg, resume)
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"] + 1, state["history"]
        torch.set_rng_state(state["rng"])  # noise draws continue as if never interrupted
        accelerator.print(f"resuming {ckpt_path.parent} from epoch {start}")
    has_proj = model.proj is not None
    model, optimizer = accelerator.prepare(model, optimizer)
    steps_per_epoch = math.ceil(len(data.labels) // accelerator.num_processes / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch  # the warm start is inside the budget: equal epochs for every method
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    images = data.images.to(accelerator.device)  # small datasets live on the device whole; batches are gathers
    data = targets_to(data, accelerator.device)
    run = _Run(accelerator, model, optimizer, data, images, steps_per_epoch, total_steps, warmup, has_proj)
    return run, start, history


def _train_epoch(run: _Run, cfg: TrainConfig, epoch: int, input_size: int) -> dict:
    """One epoch of optimiser steps; returns the epoch's mean logs, last lr and throughput."""
    acc, device, data = run.accelerator, run.accelerator.device, run.data
    run.model.train()
    order, view_index = epoch_plan(cfg, data, epoch, acc.process_index, acc.num_processes)
    views = epoch_views(cfg, data, epoch, view_index, run.images.shape[-1])
    # One copy per epoch to where the targets live: the steps below slice and gather without host copies.
    where = data.labels.device
    order, view_index, views = order.to(where), view_index.to(where), views.to(where)
    warm = run.has_proj and epoch < cfg.warmstart_epochs
    sums: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    desc = f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}"
    for step in tqdm(range(run.steps_per_epoch), desc=desc, leave=False, disable=not acc.is_local_main_process):
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        lr, beta2 = schedule(epoch * run.steps_per_epoch + step, run.total_steps, run.warmup, cfg)
        for group in run.optimizer.param_groups:
            group["lr"], group["betas"] = lr * group["lr_mult"], (0.9, beta2)
        x = apply_views(run.images[idx.to(device)], views[idx].to(device), input_size, data.mean, data.std)
        with acc.autocast():
            loss, logs = run.model(x, _batch(data, idx, view_index, device), cfg.objective, warm)
        run.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        run.optimizer.step()
        for key, value in logs.items():  # summed on the device: no host sync per step
            sums[key] = sums.get(key, 0.0) + value.float()
    seconds = time.perf_counter() - started
    means = {k: float(v) / run.steps_per_epoch for k, v in sums.items()}
    return {"epoch": epoch + 1, "lr": lr, "seconds": seconds, "images_per_s": len(order) / seconds, **means}


def train(
    cfg: TrainConfig,
    data: TrainData,
    out: str | Path,
    input_size: int,
    evaluate_fn=None,
    resume: bool = True,
) -> tuple[Student, list[dict]]:
    """Train for cfg.epochs, checkpointing every epoch (resumes from one); returns the student and its history."""
    check_data_serves(cfg, data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    run, start, history = _start_run(cfg, data, input_size, ckpt_path, resume)
    acc = run.accelerator
    for epoch in range(start, cfg.epochs):
        record = _train_epoch(run, cfg, epoch, input_size)
        if evaluate_fn is not None and acc.is_main_process:
            record.update(evaluate_fn(acc.unwrap_model(run.model)))
        history.append(record)
        acc.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if acc.is_main_process:
            state = {
                "fingerprint": cfg.fingerprint(),
                "epoch": epoch,
                "history": history,
                "rng": torch.get_rng_state(),
                "model": acc.unwrap_model(run.model).state_dict(),
                "optimizer": run.optimizer.state_dict(),
            }
            _save_checkpoint(ckpt_path, state)
        acc.wait_for_everyone()
    return acc.unwrap_model(run.model).cpu().eval(), history
