"""`gendd teacher`: train a timm teacher on the shards, or adopt a local checkpoint / timm weights."""

from __future__ import annotations

from pathlib import Path

import typer

from stages.options import BUFFER_HELP, DATA_HELP, WORKERS_HELP


def command(
    shards: str = typer.Option(..., help="Image shard directory or URL (gendd prepare --out)."),
    out: str = typer.Option(..., help="Directory (local) for teacher.safetensors and teacher.json."),
    model: str = typer.Option("resnet18", help="timm model name."),
    small_stem: bool = typer.Option(True, help="3x3 stride-1 stem without max-pool, for small images."),
    epochs: int = typer.Option(10, help="Training epochs (ignored with --checkpoint/--pretrained)."),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(2e-3),
    weight_decay: float = typer.Option(0.05),
    policy: str = typer.Option("rrc", help="Augmentation view policy: rrc, pad_crop, flip, none."),
    seed: int = typer.Option(0),
    checkpoint: Path | None = typer.Option(None, help="Use these weights (.safetensors/.pt) instead of training."),
    pretrained: bool = typer.Option(False, help="Use timm pretrained weights from the local cache."),
    mixed_precision: str = typer.Option("no", help="no, bf16 or fp16 (accelerate)."),
    cpu: bool = typer.Option(False, help="Force the CPU even when a GPU is present."),
    data: str = typer.Option(DATA_HELP[0], help=DATA_HELP[1]),
    workers: int = typer.Option(-1, help=WORKERS_HELP),
    shuffle_buffer: int = typer.Option(4096, help=BUFFER_HELP),
) -> None:
    """Train or adopt the teacher; prints its validation top-1 and where it was written."""
    from pipeline.data import DataOptions
    from pipeline.teacher import TeacherConfig, make_teacher
    from pipeline.train import TrainConfig
    from pipeline.views import ViewPolicy

    train = TrainConfig(
        model=model,
        small_stem=small_stem,
        method="ce",
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        policy=ViewPolicy(kind=policy),
        seed=seed,
        mixed_precision=mixed_precision,
        cpu=cpu,
    )
    options = DataOptions(data, workers, shuffle_buffer)
    card = make_teacher(TeacherConfig(shards, out, train, checkpoint, pretrained, options))
    if not card:  # a non-main process under `accelerate launch`
        return
    top1 = card["extra"]["val_top1"]
    typer.echo(
        f"teacher {model}: feature dim {card['feature_dim']}, val top-1 "
        f"{'n/a' if top1 is None else f'{top1:.2f}%'} -> {out}/teacher.safetensors, {out}/teacher.json"
    )
