"""Models come from timm: one factory, a small-image stem option, and timm's feature contract."""

from __future__ import annotations

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


def _swap_small_stem(model: nn.Module) -> None:
    """CIFAR-style stem for small images: the first conv becomes 3x3 stride 1 and the first max-pool goes away."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise GenddError(f"{type(model).__name__} has no conv stem to adapt; drop --small-stem for this model")
    name, conv = convs[0]
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
