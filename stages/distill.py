"""`gendd distill`: train one student with one method from the cached teacher."""

from __future__ import annotations

import typer

from stages.options import BUFFER_HELP, DATA_HELP, WORKERS_HELP


def command(
    shards: str = typer.Option(..., help="Image shard directory or URL (gendd prepare --out)."),
    cache: str | None = typer.Option(None, help="Feature cache directory or URL (gendd extract --out); not for ce."),
    out: str = typer.Option(..., help="Output directory (local): student, head, checkpoint, train.json, live/."),
    student: str = typer.Option("resnet10t", help="timm model name of the student."),
    small_stem: bool = typer.Option(True, help="3x3 stride-1 stem without max-pool, for small images."),
    method: str = typer.Option("gendd", help="gendd, gendd_unsup, kd, kl or ce."),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(2e-3),
    weight_decay: float = typer.Option(0.05),
    warmup_epochs: float = typer.Option(1.0),
    warmstart_epochs: int = typer.Option(0, help="Stage-1 epochs: student -> Linear -> frozen teacher head, CE."),
    contraction: float = typer.Option(0.9, help="Distribution Contraction lambda (0 = none)."),
    mixup_beta: float = typer.Option(1.0, help="Feature mixup Beta parameter (0 = off)."),
    kd_alpha: float = typer.Option(1.0),
    kd_tau: float = typer.Option(4.0),
    logit_adjust: float = typer.Option(
        0.0, help="Long-tailed data: the label CE (ce, kd, GenDD's probe) sees logits + tau*log(class prior); 0 = off."
    ),
    token_dim: int = typer.Option(64, help="Split Tokenization: teacher feature dims per token."),
    head_width: int = typer.Option(1024),
    head_depth: int = typer.Option(3),
    diffusion_batch_mul: int = typer.Option(4, help="Noise draws per (sample, token) row."),
    cond_dropout: float = typer.Option(0.2),
    head_lr_mult: float = typer.Option(2.5, help="Head and probe lr over the backbone lr (1 = paper's single lr)."),
    target_norm: bool = typer.Option(True, help="Standardise diffusion targets per dimension (off = paper's raw)."),
    head_prediction: str = typer.Option(
        "v_prediction", help="What the head predicts: v_prediction, epsilon (paper) or sample (x0)."
    ),
    input_size: int | None = typer.Option(None, help="Student input size (default: the teacher's)."),
    policy: str = typer.Option("rrc", help="Augmentation when training without a cache (ce)."),
    seed: int = typer.Option(0),
    mixed_precision: str = typer.Option("no", help="no, bf16 or fp16 (accelerate)."),
    cpu: bool = typer.Option(False, help="Force the CPU."),
    resume: bool = typer.Option(True, help="Continue from <out>/checkpoint.pt when it exists."),
    data: str = typer.Option(DATA_HELP[0], help=DATA_HELP[1]),
    workers: int = typer.Option(-1, help=WORKERS_HELP),
    shuffle_buffer: int = typer.Option(4096, help=BUFFER_HELP),
) -> None:
    """Distil a student; checkpoints every epoch and resumes automatically."""
    from pipeline.data import DataOptions
    from pipeline.distill import DistillConfig, distill
    from pipeline.objectives import ObjectiveConfig
    from pipeline.train import TrainConfig
    from pipeline.views import ViewPolicy

    objective = ObjectiveConfig(method, contraction, mixup_beta, kd_alpha, kd_tau, logit_adjust)
    train = TrainConfig(
        model=student,
        small_stem=small_stem,
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        warmstart_epochs=warmstart_epochs,
        objective=objective,
        head_token_dim=token_dim,
        head_width=head_width,
        head_depth=head_depth,
        diffusion_batch_mul=diffusion_batch_mul,
        cond_dropout=cond_dropout,
        head_lr_mult=head_lr_mult,
        target_norm=target_norm,
        head_prediction=head_prediction,
        input_size=input_size,
        policy=ViewPolicy(kind=policy),
        seed=seed,
        mixed_precision=mixed_precision,
        cpu=cpu,
    )
    options = DataOptions(data, workers, shuffle_buffer)
    summary = distill(DistillConfig(shards, cache, out, train, resume, options))
    final = summary["final"]
    top1 = final.get("val_probe_top1")
    typer.echo(
        f"{method} {student}: {summary['epochs']} epochs in {summary['train_seconds']:.1f}s, "
        f"val probe top-1 {'n/a' if top1 is None else f'{top1:.2f}%'} -> {out}/student.safetensors"
    )
