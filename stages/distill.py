"""`gendd distill`: train one student with one method from the cached teacher."""

from __future__ import annotations

import typer

from pipeline.config import (
    TUNED_LR,
    CheckpointPolicy,
    DataOptions,
    HeadSettings,
    ObjectiveConfig,
    TrainConfig,
    ViewPolicy,
)
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
    Method,
    Policy,
    Precision,
    Prediction,
    default,
    pin_threads,
    use_cpu,
)

T, OBJ, H, D, C = TrainConfig, ObjectiveConfig, HeadSettings, DataOptions, CheckpointPolicy
LR_HELP = (
    "Peak learning rate (default: the method's tuned one, "
    + ", ".join(f"{m} {lr:g}" for m, lr in TUNED_LR.items())
    + "; swept on a Fashion-MNIST holdout, test_resnet, 10 epochs, batch 128; GenDD's checked on digits too)."
)


def command(
    shards: str = typer.Option(..., help="Image shard directory or URL (gendd prepare --out)."),
    cache: list[str] | None = typer.Option(
        None,
        help="Feature cache directory or URL (gendd extract --out); not for ce. Repeat it to distil from several "
        "teachers' caches of one view plan (an ensemble: README).",
    ),
    out: str = typer.Option(..., help="Output directory (local): student.safetensors/.json, head, train.json."),
    work_dir: str | None = typer.Option(
        None, help="Directory for checkpoint.pt and the live training metrics (live/); default: --out."
    ),
    student: str = typer.Option(default(T, "model"), help="timm model name of the student."),
    small_stem: bool = typer.Option(default(T, "small_stem"), help="3x3 stride-1 stem, no max-pool (small images)."),
    method: Method = typer.Option(default(OBJ, "method"), help="Distillation method (README: what each one trains)."),
    epochs: int = typer.Option(default(T, "epochs"), help="Training epochs (a larger value continues a finished run)."),
    batch_size: int = typer.Option(default(T, "batch_size"), help="Samples per optimiser step (all processes)."),
    lr: float | None = typer.Option(default(T, "lr"), help=LR_HELP),
    weight_decay: float = typer.Option(default(T, "weight_decay"), help="AdamW weight decay of the backbone."),
    warmup_epochs: float = typer.Option(default(T, "warmup_epochs"), help="Linear learning-rate warm-up, in epochs."),
    warmstart_epochs: int = typer.Option(
        default(T, "warmstart_epochs"), help="Stage-1 epochs: student -> Linear -> frozen teacher head."
    ),
    warmstart_before: bool = typer.Option(
        default(T, "warmstart_before"),
        help="Run the warm start as its own stage before the --epochs budget (own warm-up and cosine), not within it.",
    ),
    contraction: float = typer.Option(default(OBJ, "contraction"), help="Distribution Contraction lambda (0 = none)."),
    mixup_beta: float = typer.Option(default(OBJ, "mixup_beta"), help="Feature mixup Beta parameter (0 = off)."),
    soft_anchor: float = typer.Option(
        default(OBJ, "soft_anchor"),
        help="Contraction anchor (a*onehot(y) + (1-a)*softmax(teacher logits)) @ W; 1 = hard W[y].",
    ),
    kd_alpha: float = typer.Option(default(OBJ, "kd_alpha"), help="kd: weight of the KL term."),
    kd_tau: float = typer.Option(default(OBJ, "kd_tau"), help="kd: softmax temperature."),
    logit_adjust: float = typer.Option(
        default(OBJ, "logit_adjust"),
        help="Long-tailed data: the label CE (ce, kd, GenDD's probe) sees logits + tau*log(class prior); 0 = off.",
    ),
    token_dim: int = typer.Option(default(H, "token_dim"), help="Split Tokenization: teacher dims per token."),
    head_width: int = typer.Option(default(H, "width"), help="Width of the diffusion head's MLP (paper: 1024)."),
    head_depth: int = typer.Option(default(H, "depth"), help="Residual blocks of the diffusion head."),
    diffusion_batch_mul: int = typer.Option(
        default(H, "diffusion_batch_mul"), help="Noise draws per (sample, token) row (paper: 10)."
    ),
    cond_dropout: float = typer.Option(default(H, "cond_dropout"), help="Condition dropout (for guidance)."),
    head_lr_mult: float = typer.Option(
        default(H, "lr_mult"), help="Head and probe lr over the backbone lr (1 = paper's single lr)."
    ),
    target_norm: bool = typer.Option(
        default(H, "target_norm"), help="Standardise diffusion targets per dimension (off = paper's raw)."
    ),
    timestep_power: float = typer.Option(
        default(H, "timestep_power"), help="Training timesteps T*u^p: 1 = uniform, < 1 = more high-noise steps."
    ),
    learn_sigma: bool = typer.Option(
        default(H, "learn_sigma"),
        help="Learned variance head (official): variational-bound loss; DDPM samples with it.",
    ),
    head_prediction: Prediction = typer.Option(
        default(H, "prediction"), help="What the head predicts: v_prediction, epsilon (paper) or sample (x0)."
    ),
    probe_on_condition: bool = typer.Option(
        default(H, "probe_on_condition"),
        help="GenDD: train the probe on the head's normalised condition (detached), not the raw feature.",
    ),
    refit_readout: bool = typer.Option(
        False, help="After training, refit the student's classifier on its frozen train features (logistic regression)."
    ),
    input_size: int | None = typer.Option(None, help="Student input size (default: the teacher's)."),
    policy: Policy = typer.Option(default(T, "policy").kind, help=POLICY_HELP + " Used without a cache (ce)."),
    seed: int = typer.Option(default(T, "seed"), help="Seed of initialisation, sample order and views."),
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
    """Distil a student; checkpoints within and after every epoch and resumes automatically."""
    pin_threads(threads)
    from pipeline.distill.distill import DistillConfig, distill

    # One settings dataclass per group of options; --head-width is HeadSettings.width, and so on.
    objective = ObjectiveConfig(
        method=method,
        contraction=contraction,
        mixup_beta=mixup_beta,
        kd_alpha=kd_alpha,
        kd_tau=kd_tau,
        logit_adjust=logit_adjust,
        soft_anchor=soft_anchor,
    )
    head = HeadSettings(
        token_dim=token_dim,
        width=head_width,
        depth=head_depth,
        diffusion_batch_mul=diffusion_batch_mul,
        cond_dropout=cond_dropout,
        prediction=head_prediction,
        lr_mult=head_lr_mult,
        target_norm=target_norm,
        probe_on_condition=probe_on_condition,
        timestep_power=timestep_power,
        learn_sigma=learn_sigma,
    )
    train = TrainConfig(
        model=student,
        small_stem=small_stem,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        warmstart_epochs=warmstart_epochs,
        warmstart_before=warmstart_before,
        objective=objective,
        head=head,
        input_size=input_size,
        policy=ViewPolicy(kind=policy),
        seed=seed,
        mixed_precision=mixed_precision,
        cpu=use_cpu(device),
        checkpoints=CheckpointPolicy(every_steps=checkpoint_every, every_minutes=checkpoint_minutes),
    )
    options = DataOptions(mode=data, workers=workers, shuffle_buffer=shuffle_buffer)
    config = DistillConfig(
        shards=shards,
        cache=tuple(cache or ()) or None,
        out=out,
        train=train,
        resume=resume,
        data=options,
        work_dir=work_dir,
        refit_readout=refit_readout,
    )
    typer.echo(result_line(distill(config), train, out))


def result_line(summary: dict, train: TrainConfig, out: str) -> str:
    """What `gendd distill` prints when done: run, epochs and time, the last val probe top-1, the exported weights."""
    top1 = summary.get("refit_readout", summary["final"]).get("val_probe_top1")
    readout = " (refit readout)" if "refit_readout" in summary else ""
    return (
        f"{train.objective.method} {train.model}: {summary['epochs']} epochs in {summary['train_seconds']:.1f}s, "
        f"val probe top-1{readout} {'n/a' if top1 is None else f'{top1:.2f}%'} -> {out}/student.safetensors"
    )
