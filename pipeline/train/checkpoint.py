"""The training checkpoint: what it holds (mid-epoch too), the code version that wrote it, and whether a run may
resume from it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.errors import GenddError
from pipeline.train.input import TrainInput


def tree_hash(root: Path) -> str:
    """sha256 over every .py file under `root` (sub-packages too), in the order of their relative paths, each with
    its path: a moved, added, removed or edited module changes it."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@functools.cache
def code_hash() -> str:
    """The version of the code that decides a run's result: the tree hash of the package (pipeline/), once per
    process. A checkpoint resumes only under the code that wrote it."""
    return tree_hash(Path(__file__).resolve().parents[1])


@dataclass
class EpochProgress:
    """How far an epoch has got: its steps and what its record sums up. A mid-epoch checkpoint keeps it, so a resumed
    epoch continues at the same step and ends with the same record."""

    steps: int = 0
    images: int = 0
    seconds: float = 0.0  # training time before this process took over
    lr: float = 0.0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # summed per-step logs, on the device

    def to_state(self, seconds_now: float) -> dict:
        """The checkpoint's record of it, with `seconds_now` trained since this process took over."""
        return {
            "steps": self.steps,
            "images": self.images,
            "seconds": self.seconds + seconds_now,
            "lr": self.lr,
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
        }

    @classmethod
    def from_state(cls, raw: dict | None, device: torch.device) -> EpochProgress:
        """Inverse of `to_state` (None: an epoch not begun), its sums on `device`."""
        if raw is None:
            return cls()
        sums = {k: v.to(device) for k, v in raw["sums"].items()}
        return cls(raw["steps"], raw["images"], raw["seconds"], raw["lr"], sums)


def resume_point(state: dict) -> tuple[int, int]:
    """(epoch, step within it) a checkpoint continues at: the next epoch's start, or a mid-epoch one's step."""
    partial = state.get("partial")
    return (state["epoch"], partial["steps"]) if partial else (state["epoch"] + 1, 0)


def describe(state: dict) -> str:
    """Where a checkpoint's run stands, in words: `epoch 2` (two finished) or `step 40 of epoch 3`."""
    epoch, step = resume_point(state)
    return f"step {step} of epoch {epoch + 1}" if step else f"epoch {epoch}"


def input_layout(data: TrainInput, world: int) -> dict:
    """What, besides (seed, epoch), orders an epoch's batches: a mid-epoch checkpoint resumes only under the same."""
    layout = {"data": data.mode, "processes": world}
    if data.mode == "stream":
        # In-process reading (0 workers) orders batches as one worker does.
        layout |= {"workers": max(data.workers, 1), "shuffle buffer": data.shuffle_buffer}
    return layout


def checkpoint_state(
    epoch: int,
    progress: EpochProgress | None,
    seconds_now: float,
    history: list[dict],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict:
    """What a checkpoint holds of a run's state after `epoch` (progress None) or within it: the weights, the
    optimizer, the finished epochs' records, the epoch's progress and the random generators' states."""
    state = {
        "epoch": epoch,
        "partial": None if progress is None else progress.to_state(seconds_now),
        "history": history,
        "rng": torch.get_rng_state(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    device = next(model.parameters()).device
    if device.type == "cuda":  # the head's noise and dropout draw on the device's generator
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Weights, optimizer and random generators as the checkpoint holds them: training continues as if never
    interrupted."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def load_checkpoint(path: Path, cfg: TrainConfig, resume: bool, provenance: dict, layout: dict) -> dict | None:
    """The checkpoint at `path` when this run may continue it; None when there is none, `resume` is off, or it belongs
    to another run. A checkpoint is another run's when other code wrote it, or other settings, inputs (teacher,
    cache, dataset), more epochs than asked, or (stopped mid-epoch) another loader layout, which orders the epoch's
    remaining batches. Such a checkpoint is never resumed: it is moved aside to `<name>.stale` with a note that
    says why, and the run starts over. That is what a rerun `dvc repro` stage needs (DVC reruns a stage exactly
    when its code, params or inputs changed, and keeps the persisted checkpoint), and nothing is lost: move the
    file back and pass the old settings to continue it. Tensors are memory-mapped, not read, until they are used."""
    if not resume or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:  # another rank set it aside between the check above and here
        return None
    except Exception as err:  # torch raises several types for a damaged file (pickle, zip, EOF, mmap)
        raise GenddError(f"{path} is damaged ({type(err).__name__}): delete it, or pass --no-resume") from err
    theirs = state.get("code") if isinstance(state, dict) else None
    if theirs != code_hash():
        why = f"was written by other code (gendd code {str(theirs)[:12]}, this is {code_hash()[:12]})"
    elif state["fingerprint"] != cfg.fingerprint():
        why = "was written with other settings"
    else:
        why = _epochs_problem(state, cfg) or _provenance_problem(state.get("provenance", {}), provenance)
        why = why or _layout_problem(state, layout)
    if why:
        _set_aside(path, why)
        return None
    return state


def _set_aside(path: Path, why: str) -> None:
    stale, n = path.with_name(path.name + ".stale"), 1
    while stale.exists():  # never over an earlier one: each may hold a long run
        stale, n = path.with_name(f"{path.name}.stale{n}"), n + 1
    with contextlib.suppress(FileNotFoundError):  # another rank moved it first
        os.replace(path, stale)  # a rename: a checkpoint DVC linked is never written to
    print(f"note: {path} {why}: starting over (kept as {stale.name})", flush=True)


def _layout_problem(state: dict, layout: dict) -> str | None:
    theirs = state.get("layout") or {}
    if theirs == layout:  # the layout orders every epoch's batches: another one is another run, even between epochs
        return None
    keys = ["data"] if theirs.get("data") != layout["data"] else [k for k in layout if theirs.get(k) != layout[k]]
    differs = ", ".join(f"{k} {theirs.get(k)} (now {layout[k]})" for k in keys)
    where = "stopped within an epoch" if state.get("partial") else "was trained"
    return f"{where}, reading with {differs} (the same --data, --workers, --shuffle-buffer and processes continue it)"


def _epochs_problem(state: dict, cfg: TrainConfig) -> str | None:
    if state["epoch"] + 1 <= cfg.total_epochs:
        return None
    extra = cfg.total_epochs - cfg.epochs  # a warm start before the budget
    budget = f"--epochs {cfg.epochs}" + (f" + {extra} warm-start epochs" if extra else "")
    held = f"{state['epoch'] + 1} trained epochs"
    if state.get("partial"):
        held = f"{state['epoch']} trained epochs and {state['partial']['steps']} steps of epoch {state['epoch'] + 1}"
    return f"holds {held}, more than {budget} (--epochs {state['epoch'] + 1 - extra} or more continues it)"


def _provenance_problem(found: dict, provenance: dict) -> str | None:
    keys = [*provenance, *(key for key in found if key not in provenance)]  # the teacher first: the likeliest mix-up
    differs = [key for key in keys if found.get(key) != provenance.get(key)]
    if not differs:  # resuming would mix two teachers (or datasets) in one student
        return None
    key = differs[0]
    return f"was trained from {key} {str(found.get(key))[:16]}, this run reads {str(provenance.get(key))[:16]}"
