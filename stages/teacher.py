"""`gendd teacher`: train a timm teacher on the shards, or adopt a local checkpoint / timm weights."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config import CheckpointPolicy, DataOptions, ObjectiveConfig, TrainConfig, ViewPolicy
from stages.options import (
    BUFFER_HELP,
    CHECKPOINT_EVERY_HELP,
    CHECKPOINT_MINUTES_HELP,
    DATA_HELP,
    DEVICE_HELP,
    POLICY_HELP,
    PRECISION_HELP,
    THREADS_HELP,
    WORKERS_HELP,
    DataMode,
    Device,
    Policy,
    Precision,
    default,
    pin_threads,
    use_cpu,
)

T, D, C = TrainConfig, DataOptions, CheckpointPolicy


def command(
    shards: str = typer.Option(..., help="Image shard directory or URL (gendd prepare --out)."),
    out: str = typer.Option(..., help="Directory (local) for teacher.safetensors and teacher.json."),
    work_dir: str | None = typer.Option(None, help="Directory for the training checkpoint (default: <out>/work)."),
    model: str = typer.Option("resnet18", help="timm model name."),
    small_stem: bool | None = typer.Option(
        None,
        "--small-stem/--no-small-stem",
        help="3x3 stride-1 stem, no max-pool. Default (auto): follow --checkpoint's weights, else small for <= 64 px.",
    ),
    epochs: int = typer.Option(default(T, "epochs"), help="Training epochs (ignored with --checkpoint/--pretrained)."),
    batch_size: int = typer.Option(default(T, "batch_size"), help="Samples per optimiser step (all processes)."),
    lr: float | None = typer.Option(default(T, "lr"), help="Peak learning rate (default: ce's tuned one, 0.016)."),
    weight_decay: float = typer.Option(default(T, "weight_decay"), help="AdamW weight decay."),
    policy: Policy = typer.Option(default(T, "policy").kind, help=POLICY_HELP),
    seed: int = typer.Option(default(T, "seed"), help="Seed of initialisation, sample order and views."),
    checkpoint: Path | None = typer.Option(None, help="Use these weights (.safetensors/.pt) instead of training."),
    pretrained: bool = typer.Option(False, help="Use timm pretrained weights from the local cache."),
    mixed_precision: Precision = typer.Option(default(T, "mixed_precision"), help=PRECISION_HELP),
    device: Device = typer.Option("auto", help=DEVICE_HELP),
    threads: int = typer.Option(0, min=0, help=THREADS_HELP),
    resume: bool = typer.Option(True, help="Continue from the checkpoint in --work-dir when it exists."),
    data: DataMode = typer.Option(default(D, "mode"), help=DATA_HELP),
    workers: int = typer.Option(default(D, "workers"), help=WORKERS_HELP),
    shuffle_buffer: int = typer.Option(default(D, "shuffle_buffer"), help=BUFFER_HELP),
    checkpoint_every: int = typer.Option(default(C, "every_steps"), help=CHECKPOINT_EVERY_HELP),
    checkpoint_minutes: float = typer.Option(default(C, "every_minutes"), help=CHECKPOINT_MINUTES_HELP),
) -> None:
    """Train or adopt the teacher; prints its validation top-1 and where it was written."""
    pin_threads(threads)
    from pipeline.teacher.teacher import TeacherConfig, make_teacher

    train = TrainConfig(
        model=model,
        objective=ObjectiveConfig(method="ce"),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        policy=ViewPolicy(kind=policy),
        seed=seed,
        mixed_precision=mixed_precision,
        cpu=use_cpu(device),
        checkpoints=CheckpointPolicy(every_steps=checkpoint_every, every_minutes=checkpoint_minutes),
    )
    config = TeacherConfig(
        shards=shards,
        out=out,
        train=train,
        checkpoint=checkpoint,
        pretrained=pretrained,
        data=DataOptions(mode=data, workers=workers, shuffle_buffer=shuffle_buffer),
        small_stem=small_stem,
        work_dir=work_dir,
        resume=resume,
    )
    card = make_teacher(config)
    if not card:  # a non-main process under `accelerate launch`
        return
    top1 = card["extra"]["val_top1"]
    typer.echo(
        f"teacher {model}: feature dim {card['feature_dim']}, val top-1 "
        f"{'n/a' if top1 is None else f'{top1:.2f}%'} -> {out}/teacher.safetensors, {out}/teacher.json"
    )
