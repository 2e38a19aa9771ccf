"""The teacher: a timm model trained here with cross-entropy, or taken from a local checkpoint / timm weights."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipeline.data import DataOptions, open_train_input, train_device
from pipeline.errors import GenddError
from pipeline.evaluate import val_probe_evaluator
from pipeline.locations import check_readable
from pipeline.models import ModelCard, create_model, feature_dim, save_model
from pipeline.objectives import ObjectiveConfig
from pipeline.outputs import check_writable
from pipeline.shards import load_index
from pipeline.train import Student, TrainConfig, train


@dataclass(frozen=True)
class TeacherConfig:
    """Where the data is, which timm model, and whether to train it or load weights."""

    shards: str | Path  # a local directory or a URL
    out: str | Path  # local only (a URL is refused before any work)
    train: TrainConfig
    checkpoint: Path | None = None
    pretrained: bool = False
    data: DataOptions = field(default_factory=DataOptions)


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise GenddError(f"teacher checkpoint {path} not found; pass an existing .safetensors or .pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise GenddError(f"{path} does not fit the teacher model: {str(err).splitlines()[0]}") from err


def make_teacher(cfg: TeacherConfig) -> dict:
    """Train (or load) the teacher and save `teacher.safetensors` + `teacher.json`; returns the card."""
    check_readable(cfg.shards)
    cfg = replace(cfg, out=check_writable(cfg.out))
    index = load_index(cfg.shards)
    spec = index.spec
    size = cfg.train.input_size or int(spec["image_size"])
    mean, std = tuple(spec["mean"]), tuple(spec["std"])
    evaluator = val_probe_evaluator(cfg.shards, size, mean, std, cfg.data)
    tcfg = replace(cfg.train, method="ce", objective=ObjectiveConfig("ce"), warmstart_epochs=0, input_size=size)
    if cfg.checkpoint is not None or cfg.pretrained:
        net = create_model(tcfg.model, spec["num_classes"], spec["channels"], tcfg.small_stem, cfg.pretrained)
        if cfg.checkpoint is not None:
            _load_weights(net, cfg.checkpoint)
        student, history = Student(net, None, None), []
    else:
        if not index.labeled:
            raise GenddError("training a teacher needs labels; pass --checkpoint with a trained teacher instead")
        data = open_train_input(cfg.shards, None, cfg.data, train_device(tcfg.cpu))
        student, history = train(tcfg, data, cfg.out / "work", size, evaluator)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one process writes the outputs
        return {}
    top1 = evaluator(student)["val_probe_top1"] if evaluator else None
    card = ModelCard(
        tcfg.model,
        spec["num_classes"],
        spec["channels"],
        tcfg.small_stem,
        size,
        mean,
        std,
        feature_dim(student.net, spec["channels"], size),
        extra={"val_top1": top1, "spec_hash": index.spec_hash, "history": history},
    )
    save_model(student.net, card, cfg.out, "teacher")
    return card.__dict__
