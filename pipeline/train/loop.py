"""Training loop for students (and the teacher): batches from pipeline/train/input.py (memory or stream), replayed
views, accelerate, checkpoints after and within epochs that resume to the same weights
(pipeline/train/checkpoint.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import DataOptions, TrainConfig
from pipeline.data.shards import load_index
from pipeline.data.views import apply_views
from pipeline.devices import make_accelerator
from pipeline.errors import GenddError
from pipeline.outputs import atomic_path
from pipeline.train.checkpoint import (
    EpochProgress,
    checkpoint_state,
    code_hash,
    describe,
    input_layout,
    load_checkpoint,
    restore,
    resume_point,
)
from pipeline.train.input import EpochPlan, TrainInput, choose_mode, footprint
from pipeline.train.losses import method_module
from pipeline.train.memory import MemoryInput, TrainData, memory_input
from pipeline.train.student import Student, batch_targets, build_student, check_data_serves, param_groups

if TYPE_CHECKING:
    from pipeline.cache.ensemble import Caches


def open_train_input(
    shards: str | Path, cache: Caches, options: DataOptions, device: torch.device, split: str = "train"
) -> TrainInput:
    """The training input of a split in the requested mode (`auto`: estimated, printed and chosen)."""
    from accelerate import PartialState

    from pipeline.cache.ensemble import cache_metas
    from pipeline.train.stream import StreamInput

    index = load_index(shards)
    k = d = 0
    c = int(index.spec["num_classes"])
    if metas := cache_metas(cache, split):  # sizes only: the chosen input opens and checks the cache(s) whole
        k, c = int(metas[0].views["K"]), int(metas[0].teacher["num_classes"]) * len(metas)
        d = sum(int(meta.teacher["feature_dim"]) for meta in metas)
    mode, line = choose_mode(options.mode, footprint(index, split, k, d, c), device, split)
    if PartialState().is_main_process:
        print(line, flush=True)
    if mode == "memory":
        return memory_input(shards, cache, split)
    return StreamInput(shards, cache, split, options)


def schedule(step: int, total: int, warmup: int, cfg: TrainConfig) -> tuple[float, float]:
    """(lr, beta2) at a step of a phase of `total` steps: linear warm-up then cosine decay; beta2 ramps
    0.95 -> 0.999 along a cosine."""
    progress = step / max(total, 1)
    lr = (
        cfg.lr * (step + 1) / warmup
        if step < warmup
        else cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    )
    beta2 = cfg.beta2_end - (cfg.beta2_end - cfg.beta2_start) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr, beta2


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:  # a kill or a full disk mid-save leaves the previous checkpoint intact
        torch.save(state, tmp)


@dataclass
class _Run:
    """What one training run carries from epoch to epoch."""

    accelerator: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: TrainInput
    epoch_steps: list[int]  # optimiser steps of every epoch, known up front (the schedule needs the total)
    warmup: int
    has_proj: bool
    use_labels: bool  # labels reach the objective only for supervised methods (MethodSpec.supervised)
    checkpoint: Path
    state: dict  # what every checkpoint holds besides the weights: code, settings, provenance, data layout
    history: list[dict]
    kept: str = ""  # where the checkpoint on disk stands (`step 40 of epoch 3`), for the divergence message
    saved_at: float = 0.0  # monotonic() of the last checkpoint (or of the start)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run."""
        return sum(self.epoch_steps)

    def phase(self, cfg: TrainConfig, epoch: int) -> tuple[int, int]:
        """(first step, steps) of the schedule phase an epoch belongs to: the whole run, or, with the warm start
        before the budget, the warm start and the budget each with their own warm-up and cosine."""
        if not cfg.warmstart_before:
            return 0, self.total_steps
        split = sum(self.epoch_steps[: cfg.warmstart_epochs])
        return (0, split) if epoch < cfg.warmstart_epochs else (split, self.total_steps - split)

    def due(self, cfg: TrainConfig, epoch: int, steps: int) -> bool:
        """Whether a mid-epoch checkpoint is due after `steps` steps of `epoch` (the epoch's end writes one anyway)."""
        policy = cfg.checkpoints
        if steps >= self.epoch_steps[epoch] or not self.accelerator.is_main_process:
            return False
        by_steps = policy.every_steps > 0 and steps % policy.every_steps == 0
        return by_steps or 0 < policy.every_minutes * 60 <= monotonic() - self.saved_at

    def save(self, epoch: int, progress: EpochProgress | None, seconds_now: float = 0.0) -> None:
        """Write the checkpoint (main process): after `epoch`, or within it at `progress`."""
        model = self.accelerator.unwrap_model(self.model)
        state = self.state | checkpoint_state(epoch, progress, seconds_now, self.history, model, self.optimizer)
        if getattr(self.accelerator, "scaler", None) is not None:  # fp16: the loss scale goes on where it was
            state["scaler"] = self.accelerator.scaler.state_dict()
        _save_checkpoint(self.checkpoint, state)
        self.kept, self.saved_at = describe(state), monotonic()


def _start_run(cfg: TrainConfig, data: TrainInput, input_size: int, ckpt_path: Path, resume: bool, provenance: dict):
    """Build model and optimizer, restore a checkpoint if one matches; returns (run, first epoch, its progress)."""
    from accelerate import DistributedDataParallelKwargs

    # With a warm start, the head idles in stage 1 and the projection afterwards: DDP must allow unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.warmstart_epochs > 0)
    accelerator = make_accelerator(cfg.mixed_precision, cfg.cpu, kwargs_handlers=[ddp])
    world = accelerator.num_processes
    layout = input_layout(data, world)
    # Memory-mapped, so the loader workers forked next share its pages instead of copying them.
    state = load_checkpoint(ckpt_path, cfg, resume, provenance, layout)
    start, step = resume_point(state) if state is not None else (0, 0)
    # Before the model exists: stream loader workers forked now share little that training rewrites (stream.py).
    plan = EpochPlan(cfg.seed, start, cfg.batch_size, accelerator.process_index, world, cfg.policy)
    data.start(plan, accelerator.device, step)
    torch.manual_seed(cfg.seed)
    stats = None
    if cfg.objective.spec.uses_head and cfg.head.target_norm:
        stats = method_module(cfg.objective.method).target_stats(cfg, data)
    model = build_student(cfg, data.info, input_size, stats)
    groups = param_groups(model, cfg.weight_decay, cfg.head.lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2_start))
    if state is not None:
        restore(state, model, optimizer, accelerator.device)
        accelerator.print(f"resuming {ckpt_path.parent} from {describe(state)}")
    has_proj = model.proj is not None
    model, optimizer = accelerator.prepare(model, optimizer)
    if state is not None and "scaler" in state and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    epoch_steps = [data.steps_per_epoch(cfg.seed, e, cfg.batch_size, world) for e in range(cfg.total_epochs)]
    warmup = max(1, int(cfg.warmup_epochs * epoch_steps[0]))
    data.place(accelerator.device)
    use_labels = cfg.objective.spec.supervised and data.info.labeled
    common = {"code": code_hash(), "fingerprint": cfg.fingerprint(), "provenance": provenance, "layout": layout}
    history = state["history"] if state is not None else []
    run = _Run(
        accelerator, model, optimizer, data, epoch_steps, warmup, has_proj, use_labels, ckpt_path, common, history
    )
    run.kept, run.saved_at = (describe(state) if state is not None else ""), monotonic()
    progress = EpochProgress.from_state(state.get("partial") if state is not None else None, accelerator.device)
    return run, start, progress


def _stop_if_diverged(first_bad: int, epoch: int, lr: float, kept: str) -> None:
    """Stop at a non-finite loss: nothing after the last good checkpoint is saved (none is written after it)."""
    if first_bad >= 0:
        kept = f"the checkpoint keeps {kept}" if kept else "nothing was saved"
        raise GenddError(
            f"epoch {epoch + 1} step {first_bad + 1}: the training loss is NaN or inf ({kept}): lower --lr "
            f"(now {lr:g}) or check the inputs with gendd cache verify"
        )


def _join(run: _Run):
    """Under DDP, ranks may get uneven batch counts from the stream: the ones done first shadow the others'
    all-reduces (torch Join), so no rank waits forever and no sample is dropped."""
    from contextlib import nullcontext

    if run.accelerator.num_processes == 1 or not hasattr(run.model, "join_hook"):
        return nullcontext()
    from torch.distributed.algorithms.join import Join

    return Join([run.model], throw_on_early_termination=False)


def _train_step(run: _Run, cfg: TrainConfig, batch: dict, lr: float, beta2: float, warm: bool, input_size: int):
    """One optimiser step at this learning rate and beta2; returns the loss and the logs."""
    acc, device, info = run.accelerator, run.accelerator.device, run.data.info
    for group in run.optimizer.param_groups:
        group["lr"], group["betas"] = lr * group["lr_mult"], (0.9, beta2)
    pixels = batch["images"].to(device, non_blocking=True)
    x = apply_views(pixels, batch["views"].to(device, non_blocking=True), input_size, info.mean, info.std)
    with acc.autocast():
        targets = batch_targets(batch, info, device, run.use_labels)
        loss, logs = run.model(x, targets, cfg.objective, warm)
    run.optimizer.zero_grad(set_to_none=True)
    acc.backward(loss)
    run.optimizer.step()
    return loss, logs


def _train_epoch(run: _Run, cfg: TrainConfig, epoch: int, input_size: int, progress: EpochProgress) -> dict:
    """One epoch of optimiser steps from `progress` on (a mid-epoch resume), writing mid-epoch checkpoints when due;
    returns the epoch's mean logs, last lr and throughput."""
    acc, device = run.accelerator, run.accelerator.device
    run.model.train()
    plan = EpochPlan(cfg.seed, epoch, cfg.batch_size, acc.process_index, acc.num_processes, cfg.policy)
    warm = run.has_proj and epoch < cfg.warmstart_epochs
    first = sum(run.epoch_steps[:epoch])
    phase_start, phase_steps = run.phase(cfg, epoch)
    if cfg.warmstart_before and epoch == cfg.warmstart_epochs and progress.steps == 0:
        # The budget starts as a separate run would (the official recipes reload stage 1's weights only): a fresh
        # optimizer state. A resume after this point restores the budget's own state from the checkpoint.
        run.optimizer.state.clear()
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss, -1 = none
    started = time.perf_counter()
    desc = f"{cfg.objective.method} epoch {epoch + 1}/{cfg.total_epochs}"
    bar = tqdm(
        total=run.epoch_steps[epoch],
        initial=progress.steps,
        desc=desc,
        leave=False,
        disable=not acc.is_local_main_process,
    )
    with _join(run):
        for batch in run.data.batches(plan, progress.steps):
            progress.lr, beta2 = schedule(first + progress.steps - phase_start, phase_steps, run.warmup, cfg)
            loss, logs = _train_step(run, cfg, batch, progress.lr, beta2, warm, input_size)
            for key, value in logs.items():  # summed on the device: no host sync per step
                progress.sums[key] = progress.sums.get(key, 0.0) + value.float()
            bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, progress.steps), first_bad)
            progress.steps, progress.images = progress.steps + 1, progress.images + len(batch["images"])
            # A host sync every 50 steps (a diverged run stops soon, not at the epoch's end) and before a checkpoint.
            due = run.due(cfg, epoch, progress.steps)
            if progress.steps % 50 == 0 or due:
                _stop_if_diverged(int(first_bad), epoch, cfg.lr, run.kept)
            if due:
                run.save(epoch, progress, time.perf_counter() - started)
            bar.update()
    bar.close()
    _stop_if_diverged(int(first_bad), epoch, cfg.lr, run.kept)
    seconds = progress.seconds + time.perf_counter() - started
    images = progress.images
    if acc.num_processes > 1:  # samples every rank trained on: the stream mode's "each sample once" is checkable
        images = int(acc.reduce(torch.tensor([images], device=device), reduction="sum"))
    means = {k: float(v) / max(progress.steps, 1) for k, v in progress.sums.items()}
    record = {"epoch": epoch + 1, "lr": progress.lr or cfg.lr, "seconds": seconds, "samples": images}
    return record | {"images_per_s": images / seconds} | means


def train(
    cfg: TrainConfig,
    data: TrainInput | TrainData,
    out: str | Path,
    input_size: int,
    evaluate_fn=None,
    resume: bool = True,
    provenance: dict | None = None,
    on_epoch: Callable[[list[dict]], None] | None = None,
) -> tuple[Student, list[dict]]:
    """Train for cfg.epochs, checkpointing after every epoch and within epochs per `cfg.checkpoints` (resumes from
    one at the step it reached, with the same remaining batches); returns the student and its history.
    `provenance` (teacher checkpoint, cache and dataset fingerprints) is kept in the checkpoint: a checkpoint of
    other inputs, settings or code is set aside and the run starts over. A resume with more `epochs` than the
    checkpoint's run continues it: the cosine schedule is recomputed for the new total, from the step reached.
    `on_epoch(history)` runs on the main process after each epoch's checkpoint (live metrics)."""
    provenance = provenance or {}
    if isinstance(data, TrainData):
        data = MemoryInput(data)
    check_data_serves(cfg, data.info)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run, start, progress = _start_run(cfg, data, input_size, out / "checkpoint.pt", resume, provenance)
    acc = run.accelerator
    for epoch in range(start, cfg.total_epochs):
        record = _train_epoch(run, cfg, epoch, input_size, progress)
        progress = EpochProgress()
        if evaluate_fn is not None and acc.is_main_process:
            record.update(evaluate_fn(acc.unwrap_model(run.model)))
        run.history.append(record)
        acc.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if acc.is_main_process:
            run.save(epoch, None)
            if on_epoch is not None:
                on_epoch(run.history)
        acc.wait_for_everyone()
    if start >= cfg.total_epochs and on_epoch is not None and acc.is_main_process:
        # A finished run resumed (e.g. `dvc repro --force`, which deletes the live metrics first): write them again.
        on_epoch(run.history)
    return acc.unwrap_model(run.model).cpu().eval(), run.history
