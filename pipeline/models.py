"""Models come from timm: one factory, a small-image stem option, and timm's feature contract."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import GenddError
from pipeline.outputs import atomic_path, write_json


@dataclass(frozen=True)
class ModelCard:
    """What rebuilds a trained model without this project: timm name, classes, channels, stem, preprocessing."""

    name: str
    num_classes: int
    in_chans: int
    small_stem: bool
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    feature_dim: int
    extra: dict | None = None

    def to_json(self) -> str:
        """Serialised card."""
        return json.dumps(asdict(self), indent=1)


SMALL_INPUT_MAX = 64  # without a checkpoint to follow, inputs up to this many pixels get the small stem


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The stem: the model's first Conv2d (name, module), or None."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _swap_small_stem(model: nn.Module) -> None:
    """CIFAR-style stem for small images: the first conv becomes 3x3 stride 1 and the first max-pool goes away."""
    found = first_conv(model)
    if found is None:
        raise GenddError(f"{type(model).__name__} has no conv stem to adapt; drop --small-stem for this model")
    name, conv = found
    new = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    model.set_submodule(name, new)
    pools = [n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)]
    if pools:
        model.set_submodule(pools[0], nn.Identity())


def create_model(name: str, num_classes: int, in_chans: int, small_stem: bool, pretrained: bool = False) -> nn.Module:
    """Any timm model by name; weights only from a local cache when `pretrained` (nothing is downloaded in CI)."""
    if name not in timm.list_models(pretrained=False) and not timm.is_model(name):
        raise GenddError(f"unknown timm model {name!r}; see `timm.list_models()` for names (e.g. resnet18)")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    except Exception as err:  # timm raises many types (download, config); the user only needs the reason
        raise GenddError(f"could not build timm model {name!r}: {str(err).splitlines()[0]}") from err
    if small_stem:
        _swap_small_stem(model)
    return model


@functools.lru_cache(maxsize=16)
def _stock_stem(name: str) -> tuple[str, tuple[int, ...]] | None:
    """(weight key, kernel size) of the first conv of timm's stock `name`, or None for a model without one."""
    try:  # on the meta device: no memory, no init cost (a few timm models need real tensors to build)
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=10, in_chans=3)
    except Exception:
        model = create_model(name, 10, 3, small_stem=False)
    found = first_conv(model)
    return None if found is None else (f"{found[0]}.weight", tuple(found[1].kernel_size))


def _kernel(shape: tuple[int, ...]) -> str:
    return "x".join(str(k) for k in shape)


def checkpoint_stem(name: str, state_dict: dict) -> tuple[str, str]:
    """Which stem a state_dict for timm model `name` was trained with, read from its first conv's kernel, and why:
    "small" (3x3 where timm's stock stem is larger), "stock" (timm's own kernel), "either" (timm's stock first conv
    is 3x3 already, as in resnet10t or mobilenetv3: the weights cannot tell) or "unknown" (no such conv: another
    model)."""
    stock = _stock_stem(name)
    if stock is None:
        return "unknown", f"{name} has no conv stem"
    key, kernel = stock
    weight = state_dict.get(key)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        return "unknown", f"it has no 4-D {key} (the first conv of {name})"
    found = tuple(weight.shape[-2:])
    if kernel == (3, 3):
        return "either", f"{name}'s stock first conv {key} is 3x3 like the small stem's"
    if found == kernel:
        return "stock", f"its {key} is {_kernel(found)}"
    if found == (3, 3):
        return "small", f"its {key} is 3x3 where {name}'s stock one is {_kernel(kernel)}"
    return "unknown", f"its {key} is {_kernel(found)}, neither {name}'s stock {_kernel(kernel)} nor the small 3x3"


def _flag(small: bool) -> str:
    return "--small-stem" if small else "--no-small-stem"


def resolve_small_stem(
    setting: bool | None,
    name: str,
    input_size: int,
    state_dict: dict | None = None,
    recorded: bool | None = None,
    source: str = "the checkpoint",
) -> tuple[bool, str]:
    """The stem to build for timm model `name`. An explicit True/False is kept, and refused (GenddError) when it
    contradicts the checkpoint. None (auto) follows the checkpoint's weights when `state_dict` is given, else picks
    the small stem for inputs up to SMALL_INPUT_MAX px. When the weights cannot tell (timm's stock first conv is
    3x3 too), `recorded` decides (the stem the gendd card saved with the checkpoint states), else timm's stock
    stem. `source` names the checkpoint in errors. Returns (small, a few words on how it was chosen: the teacher's
    card records them)."""
    if state_dict is None:
        if setting is not None:
            return setting, f"{_flag(setting)} (no checkpoint)"
        small = input_size <= SMALL_INPUT_MAX
        return small, f"auto: {input_size} px input {'<=' if small else '>'} {SMALL_INPUT_MAX} px"
    verdict, why = checkpoint_stem(name, state_dict)
    if verdict in ("small", "stock"):
        found: bool | None = verdict == "small"
    elif recorded is not None:
        found, why = recorded, f"the card saved with it records small_stem={str(recorded).lower()}"
    else:
        found = None
    if setting is None:
        if found is not None:
            return found, f"auto: from the checkpoint ({why})"
        if verdict == "either":  # without a gendd card saying otherwise, a checkpoint is stock timm
            return False, f"auto: stock stem ({why}; no card says otherwise)"
        small = input_size <= SMALL_INPUT_MAX  # another model: loading it will say what does not fit
        return small, f"auto: {input_size} px input ({why})"
    if found is not None and setting != found:
        has = "the small 3x3 stem" if found else f"{name}'s stock stem"
        raise GenddError(
            f"{source} has {has} ({why}), but {_flag(setting)} asks for the other one: leave out "
            f"{_flag(setting)} (the stem then follows the checkpoint) or pass {_flag(found)}"
        )
    return setting, _flag(setting)


@dataclass(frozen=True)
class StateDiff:
    """How a state_dict differs from a model's: shape mismatches (key, checkpoint shape, model shape), in model
    order, then keys the model has and the checkpoint lacks, and keys only the checkpoint has."""

    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    missing: list[str]
    unexpected: list[str]

    def __bool__(self) -> bool:
        return bool(self.shapes or self.missing or self.unexpected)


def state_diff(model: nn.Module, state_dict: dict) -> StateDiff:
    """Compare a state_dict with the model's own, key by key (what load_state_dict would refuse)."""
    own = model.state_dict()
    shapes = [
        (k, tuple(state_dict[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    return StateDiff(shapes, missing, unexpected)


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logit features (B, D) through timm's uniform contract."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def linear_head(model: nn.Module) -> nn.Linear:
    """The model's final linear classifier: logits = features @ W.T + b."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise GenddError(
            f"{type(model).__name__}'s classifier is {type(head).__name__}, not Linear; pick a timm model "
            "whose head is a single linear layer (e.g. resnet*, mobilenetv3_*, vit_*)"
        )
    return head


def feature_dim(model: nn.Module, in_chans: int, input_size: int) -> int:
    """Size of the pre-logit feature, measured by one forward (some timm heads change it)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # wherever an evaluation left it (the GPU after a val pass)
    with torch.no_grad():
        dim = features(model, torch.zeros(1, in_chans, input_size, input_size, device=device)).shape[-1]
    model.train(was_training)
    return int(dim)


def sha256_file(path: str | Path) -> str:
    """Fingerprint of a checkpoint file (stored in caches so mismatched teachers are refused)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: nn.Module, card: ModelCard, out_dir: str | Path, stem: str) -> Path:
    """Write `<stem>.safetensors` and `<stem>.json` (the card, plus the weights' sha256)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{stem}.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # never export a model that cannot predict
        raise GenddError(f"{stem} weights hold NaN or inf ({bad[0]}): nothing exported; lower --lr and train again")
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    # The card is written last: a card means its weights are whole.
    write_json(out / f"{stem}.json", {**asdict(card), "sha256": sha256_file(weights)})
    return weights


def load_card(out_dir: str | Path, stem: str) -> dict:
    """Read a saved card (with its sha256)."""
    path = Path(out_dir) / f"{stem}.json"
    if not path.is_file():
        raise GenddError(f"{path} not found; run the stage that writes it (gendd teacher / gendd distill) first")
    try:
        card = json.loads(path.read_text())
    except ValueError as err:
        raise GenddError(f"{path} is damaged ({err}): re-run the stage that wrote it") from err
    missing = [
        k for k in ("name", "num_classes", "in_chans", "small_stem") if not isinstance(card, dict) or k not in card
    ]
    if missing:
        raise GenddError(f"{path} lacks {', '.join(missing)}: re-run the stage that wrote it")
    return card


def load_model(out_dir: str | Path, stem: str) -> tuple[nn.Module, dict]:
    """Rebuild a saved model through timm and load its weights; returns (model in eval mode, card)."""
    card = load_card(out_dir, stem)
    model = create_model(card["name"], card["num_classes"], card["in_chans"], card["small_stem"])
    weights = Path(out_dir) / f"{stem}.safetensors"
    if not weights.is_file():
        raise GenddError(f"{weights} not found next to its card; re-run the stage that writes it")
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors' own error type for a damaged header or a truncated file
        raise GenddError(f"{weights} is damaged ({str(err).splitlines()[0]}): re-run the stage that wrote it") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise GenddError(f"{weights} does not fit {card['name']}: {str(err).splitlines()[0]}") from err
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GenddError(f"{weights}: weight {bad[0]} holds NaN or inf: train the model again")
    return model.eval(), card
