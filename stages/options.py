"""What several stages share: option types that list their choices, defaults read from the settings dataclasses
(one source for the CLI, the library and params.yaml), help texts, and the one device option."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pipeline.config import (
    CODECS,
    DATA_MODES,
    DEVICES,
    FORMATS,
    METHODS,
    MIXED_PRECISION,
    POLICIES,
    PREDICTIONS,
    SAMPLERS,
    SPACINGS,
)
from pipeline.errors import GenddError

# Literal types: typer lists their values in --help and refuses others before the command runs.
Method = Literal[METHODS]
Prediction = Literal[PREDICTIONS]
Sampler = Literal[SAMPLERS]
Spacing = Literal[SPACINGS]
Policy = Literal[POLICIES]
DataMode = Literal[DATA_MODES]
Codec = Literal[CODECS]
Format = Literal[FORMATS]
Precision = Literal[MIXED_PRECISION]
Device = Literal[DEVICES]


def default(cls: type, name: str) -> Any:
    """The default of field `name` of settings dataclass `cls` (the CLI never repeats a default literally)."""
    spec = cls.__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


DATA_HELP = (
    "Input mode: memory (the whole split in RAM, fastest for small sets), stream (shards read per epoch, memory "
    "flat in the dataset size), or auto (estimates the footprint, prints it and picks)."
)
WORKERS_HELP = "Stream mode: data loader processes (-1 = auto: the cores beyond two, at least 1, up to 8)."
BUFFER_HELP = "Stream mode: samples each loader worker shuffles among (memory ~ buffer x one decoded sample)."
DEVICE_HELP = "auto: the GPU when there is one, else the CPU; cpu; cuda (refused when no GPU is visible)."
PRECISION_HELP = "Mixed precision through accelerate: no, bf16 or fp16 (GPU)."
POLICY_HELP = "Augmentation views: rrc (random resized crop + flip), pad_crop, flip, none."
CHECKPOINT_EVERY_HELP = (
    "Also write the training checkpoint after every N-th optimiser step of an epoch (0 = not by step count); one is "
    "always written at each epoch's end. A resume continues at the saved step with the same sample order and ends "
    "with the same weights; never part of the run's settings, so changing it keeps a checkpoint."
)
CHECKPOINT_MINUTES_HELP = (
    "Also write the training checkpoint after the first step more than M minutes after the previous one (0 = not by "
    "time): a crash loses minutes, not an epoch. Saving changes no result."
)


THREADS_HELP = (
    "CPU threads for torch, BLAS and OpenMP (0 = the libraries' default, every core). CPU results differ with it in "
    "the last digits (float sums): params.yaml pins it, so `dvc repro` gives the same figures on every machine."
)


def pin_threads(threads: int) -> None:
    """Apply --threads before any work (0 leaves the libraries' defaults)."""
    if threads:
        from pipeline.devices import pin_cpu_threads

        pin_cpu_threads(threads)


def use_cpu(device: str) -> bool:
    """The library's `cpu` flag for a --device choice; `cuda` without a visible GPU is refused in one line."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise GenddError("--device cuda: no CUDA device is visible: pass --device cpu (or auto)")
    return device == "cpu"
