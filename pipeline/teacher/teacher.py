"""The teacher: a timm model trained here with cross-entropy, or taken from a local checkpoint / timm weights."""

from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipeline.config import DataOptions, ObjectiveConfig, TrainConfig
from pipeline.data.shards import load_index
from pipeline.devices import train_device
from pipeline.errors import GenddError
from pipeline.locations import check_readable
from pipeline.models import (
    ModelCard,
    create_model,
    feature_dim,
    first_conv,
    linear_head,
    resolve_small_stem,
    save_model,
    sha256_file,
    state_diff,
)
from pipeline.outputs import check_writable
from pipeline.train.loop import open_train_input, train
from pipeline.train.probe import val_probe_evaluator
from pipeline.train.student import Student


@dataclass(frozen=True)
class TeacherConfig:
    """Where the data is, which timm model, and whether to train it or load weights.

    `small_stem`: the teacher's stem; True/False, or None (auto) to follow the checkpoint, else the input size (see
    pipeline.models.resolve_small_stem). It replaces `train.small_stem`, which the teacher does not read."""

    shards: str | Path  # a local directory or a URL
    out: str | Path  # local only (a URL is refused before any work)
    train: TrainConfig
    checkpoint: Path | None = None
    pretrained: bool = False
    data: DataOptions = field(default_factory=DataOptions)
    small_stem: bool | None = None
    work_dir: str | Path | None = None  # checkpoint.pt of the training run (default: <out>/work); DVC caches `out`
    resume: bool = True  # continue from checkpoint.pt in work_dir when it exists


CHECKPOINT_ENTRIES = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order: EMA weights first


_WRAPPERS = ("_orig_mod.", "module.")  # torch.compile and DDP key prefixes, in either order


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's weights (wrapper prefixes stripped), the dict entry they came from, and its gendd card."""

    state: dict[str, torch.Tensor]
    entry: str | None
    card: dict | None


def _strip(key: str) -> str:
    while key.startswith(_WRAPPERS):
        for prefix in _WRAPPERS:
            key = key.removeprefix(prefix)
    return key


def _saved_card(path: Path) -> dict | None:
    """The gendd card saved with this very file (`<stem>.json` next to it, with its sha256), else None."""
    card_path = path.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or not isinstance(card.get("small_stem"), bool) or "sha256" not in card:
        return None
    return card if card["sha256"] == sha256_file(path) else None


def read_checkpoint(path: Path) -> Checkpoint:
    """Weights as timm and torch save them: a state_dict in .safetensors or .pt/.pth, or a dict holding one under
    state_dict_ema / model_ema / state_dict / model (timm's train.py checkpoints), keys maybe `module.`-prefixed."""
    if not path.is_file():
        raise GenddError(f"teacher checkpoint {path} not found; pass an existing .safetensors or .pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path))
        except OSError:
            raise
        except Exception as err:  # safetensors' own error for a damaged header or a truncated file
            raise GenddError(f"{path} is not a readable .safetensors file ({str(err).splitlines()[0]})") from err
    else:
        try:  # timm's train.py stores its argparse options next to the weights
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except pickle.UnpicklingError as err:
            raise GenddError(
                f"{path} holds more than weights (a pickled model or other objects, refused as unsafe to load): "
                "save its state_dict instead, e.g. torch.save(model.state_dict(), 'teacher.pth')"
            ) from err
        except Exception as err:  # a truncated or foreign file: torch raises several types
            raise GenddError(
                f"{path} cannot be read as a torch checkpoint ({str(err).splitlines()[0]}): "
                "pass a .safetensors file or a state_dict saved with torch.save"
            ) from err
    if not isinstance(raw, dict):
        raise GenddError(f"{path} holds a {type(raw).__name__}, not a state_dict: save model.state_dict() instead")
    entry = None
    if not all(isinstance(v, torch.Tensor) for v in raw.values()):
        entry = next((k for k in CHECKPOINT_ENTRIES if isinstance(raw.get(k), dict)), None)
        if entry is None:
            raise GenddError(
                f"{path} is neither a state_dict nor a checkpoint holding one under {', '.join(CHECKPOINT_ENTRIES)} "
                f"(its keys: {', '.join(map(str, list(raw)[:5]))}): save model.state_dict() instead"
            )
        raw = raw[entry]
    state = {_strip(str(k)): v for k, v in raw.items()}
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None or not state:
        what = f"its entry {odd!r} is not a tensor" if odd is not None else "it holds no tensors"
        raise GenddError(f"{path}: {what}: save model.state_dict() instead")
    return Checkpoint(state, entry, _saved_card(path))


def _shape(shape: tuple[int, ...]) -> str:
    return f"[{', '.join(map(str, shape))}]"


def _owned_keys(model: torch.nn.Module, module: torch.nn.Module) -> tuple[str, set[str]]:
    name = next(n for n, m in model.named_modules() if m is module)
    return name, {f"{name}.{k}" if name else k for k in module.state_dict()}


def fit_error(model: torch.nn.Module, ckpt: Checkpoint, path: Path, name: str, spec: dict) -> str | None:
    """One line saying why the checkpoint's weights do not fit the teacher built for this data (None: they fit):
    the first mismatching tensors, missing/unexpected key counts, and the option or step that fixes it."""
    diff = state_diff(model, ckpt.state)
    missing = [k for k in diff.missing if not k.endswith("num_batches_tracked")]  # BN counters: never read in eval
    if not (diff.shapes or missing or diff.unexpected):
        return None
    parts = [f"{k}: checkpoint {_shape(a)} vs model {_shape(b)}" for k, a, b in diff.shapes[:3]]
    if len(diff.shapes) > 3:
        parts.append(f"{len(diff.shapes) - 3} more tensors differ")
    if missing or diff.unexpected:
        counts = f"{len(missing)} missing keys" + (f" (e.g. {missing[0]})" if missing else "")
        if diff.unexpected:  # an example with weights in it (a checkpoint's key order is arbitrary)
            example = min(diff.unexpected, key=lambda k: (k.endswith("num_batches_tracked"), k))
            counts += f", {len(diff.unexpected)} unexpected (e.g. {example})"
        else:
            counts += ", 0 unexpected"
        parts.append(counts)
    theirs = {k: a for k, a, _ in diff.shapes}
    head_name, head_keys = _owned_keys(model, linear_head(model))
    stem = first_conv(model)
    stem_key = f"{stem[0]}.weight" if stem else ""
    ours = model.state_dict()
    in_chans = None  # the checkpoint's input channels, when only those differ in the first conv
    if stem_key in theirs and len(theirs[stem_key]) == 4:
        a, b = theirs[stem_key], tuple(ours[stem_key].shape)
        in_chans = a[1] if (a[0], *a[2:]) == (b[0], *b[2:]) else None
    off_head = [k for k in [*theirs, *missing, *diff.unexpected] if k not in head_keys]
    if any(k != stem_key or in_chans is None for k in off_head):
        card = ckpt.card or {}
        said = f" (the card saved with it says {card['name']})" if card.get("name") not in (None, name) else ""
        hints = [f"it is not a {name}{said}: pass the --model it was built with"]
    else:
        hints = []
        if in_chans is not None:
            hints.append(
                f"the checkpoint takes {in_chans} input channels but the data spec has {spec['channels']}: adopt a "
                f"model built with in_chans={spec['channels']}, or prepare the data with {in_chans} channels"
            )
        if any(k in head_keys for k in [*theirs, *missing]):
            weight = f"{head_name}.weight"
            has = f"classifies {theirs[weight][0]} classes" if weight in theirs else f"has no classifier ({weight})"
            hints.append(
                f"the checkpoint {has} but the data spec has {spec['num_classes']}, and the teacher's classifier is "
                "its class map: fine-tune it on this data first, or train the teacher here (leave out --checkpoint)"
            )
    return f"{path} does not fit {name} for this data: {'; '.join(parts)}: {'; '.join(hints)}"


def make_teacher(cfg: TeacherConfig) -> dict:
    """Train (or load) the teacher and save `teacher.safetensors` + `teacher.json`; returns the card.

    An adopted checkpoint is read, its stem resolved and its fit checked before any other work."""
    check_readable(cfg.shards)
    cfg = replace(cfg, out=check_writable(cfg.out))
    index = load_index(cfg.shards)
    spec = index.spec
    size = cfg.train.input_size or int(spec["image_size"])
    mean, std = tuple(spec["mean"]), tuple(spec["std"])
    name = cfg.train.model
    ckpt = read_checkpoint(Path(cfg.checkpoint)) if cfg.checkpoint is not None else None
    if ckpt is None:
        small, stem_why = resolve_small_stem(cfg.small_stem, name, size)
    else:
        recorded = ckpt.card["small_stem"] if ckpt.card else None
        small, stem_why = resolve_small_stem(cfg.small_stem, name, size, ckpt.state, recorded, str(cfg.checkpoint))
    tcfg = replace(
        cfg.train, objective=ObjectiveConfig(method="ce"), warmstart_epochs=0, input_size=size, small_stem=small
    )
    net = None
    extra: dict = {"stem_choice": stem_why}
    if ckpt is not None or cfg.pretrained:
        net = create_model(name, spec["num_classes"], spec["channels"], small, cfg.pretrained)
        if ckpt is not None:
            problem = fit_error(net, ckpt, Path(cfg.checkpoint), name, spec)
            if problem:
                raise GenddError(problem)
            net.load_state_dict(ckpt.state, strict=False)  # fit_error allowed only missing BN batch counters
            extra["checkpoint"] = {"file": Path(cfg.checkpoint).name, "entry": ckpt.entry}
    elif not index.labeled:
        raise GenddError("training a teacher needs labels; pass --checkpoint with a trained teacher instead")
    evaluator = val_probe_evaluator(cfg.shards, size, mean, std, cfg.data)
    if net is not None:
        student, history = Student(net, None, None), []
    else:
        data = open_train_input(cfg.shards, None, cfg.data, train_device(tcfg.cpu))
        work = check_writable(cfg.work_dir) if cfg.work_dir is not None else cfg.out / "work"
        # What the teacher learns from: a rerun over other shards (DVC keeps the checkpoint) never resumes it.
        origin = {"dataset spec": index.spec_hash, "train shards": index.split("train").digest}
        student, history = train(tcfg, data, work, size, evaluator, cfg.resume, provenance=origin)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one process writes the outputs
        return {}
    top1 = evaluator(student)["val_probe_top1"] if evaluator else None
    card = ModelCard(
        name=name,
        num_classes=spec["num_classes"],
        in_chans=spec["channels"],
        small_stem=small,
        input_size=size,
        mean=mean,
        std=std,
        feature_dim=feature_dim(student.net, spec["channels"], size),
        extra={"val_top1": top1, "spec_hash": index.spec_hash, "history": history, **extra},
    )
    save_model(student.net, card, cfg.out, "teacher")
    return card.__dict__
