"""Mid-epoch checkpoints: a resumed run continues at the saved step with the same remaining batches and ends with the
same weights as an uninterrupted one (memory and stream modes, any loader layout); checkpoints of other code or
another loader layout are refused; when checkpoints are written changes nothing."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import pipeline.train.checkpoint as checkpoint_module
import pipeline.train.loop as train_module
from pipeline.config import CheckpointPolicy, DataOptions, HeadSettings, ObjectiveConfig, TrainConfig
from pipeline.data.prepare import prepare_shards
from pipeline.data.shards import ShardIndex
from pipeline.data.specs import load_spec
from pipeline.errors import GenddError
from pipeline.train.checkpoint import code_hash, tree_hash
from pipeline.train.input import EpochPlan
from pipeline.train.loop import train
from pipeline.train.memory import MemoryInput
from pipeline.train.stream import StreamInput, _Shards, delivered

from .conftest import DIGITS_SPEC
from .test_stream import build_cache
from .test_train import TINY, _data

NEVER = CheckpointPolicy(every_steps=0, every_minutes=0)  # epoch ends only


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardIndex, Path]:
    """200 digits in shards of 48 (48, 48, 48, 48, 8): workers get uneven sample counts; a cache aligned with them."""
    index, _ = prepare_shards(load_spec(DIGITS_SPEC), tmp_path_factory.mktemp("uneven"), shard_size=48, max_samples=200)
    return index, build_cache(index, tmp_path_factory.mktemp("uneven_cache"))


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def _without_clock(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in ("seconds", "images_per_s")} for record in history]


# ---- the input: the same remaining batches from any step ------------------------------------------------------


class _Counted(IterableDataset):
    """Worker w yields (w, 0), (w, 1), ... counts[w] items."""

    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self.counts = counts

    def __iter__(self):
        worker = get_worker_info().id
        return iter([(worker, k) for k in range(self.counts[worker])])


def _round_robin(counts: list[int], taken: list[int], first: int) -> list[tuple[int, int]]:
    """The items left after `taken`, asking the workers in turn from `first`, skipping those with none left."""
    taken, out, w = list(taken), [], first
    while any(t < n for t, n in zip(taken, counts, strict=True)):
        if taken[w] < counts[w]:
            out.append((w, taken[w]))
            taken[w] += 1
        w = (w + 1) % len(counts)
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_delivered_follows_the_dataloaders_round_robin() -> None:
    counts = [3, 1, 5, 0]
    loader = DataLoader(_Counted(counts), batch_size=None, num_workers=4, persistent_workers=True, prefetch_factor=3)
    for _ in range(2):  # the first pass and a persistent workers' later one
        order = [tuple(int(v) for v in item) for item in loader]
        assert sorted(order) == sorted((w, k) for w, n in enumerate(counts) for k in range(n))
        for s in range(len(order) + 2):
            taken, first = delivered(counts, s)
            seen = Counter(w for w, _ in order[:s])
            assert taken == [seen[w] for w in range(len(counts))], s
            assert _round_robin(counts, taken, first) == order[s:], s  # what a pass resumed there must yield


def test_memory_batches_from_a_step_are_the_rest_of_the_epoch() -> None:
    source = MemoryInput(_data(50))
    for world, rank in ((1, 0), (2, 1)):
        plan = EpochPlan(3, 2, 8, rank, world)
        whole = list(source.batches(plan))
        for step in (1, 3, len(whole) - 1, len(whole)):
            assert _same_batches(list(source.batches(plan, step)), whole[step:]), (world, step)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("buffer", [16, 100])  # smaller than a shard (48) and larger
def test_stream_batches_from_a_step_are_the_rest_of_the_epoch(uneven, workers: int, buffer: int) -> None:
    shards, cache = uneven
    options = DataOptions(mode="stream", workers=workers, shuffle_buffer=buffer)
    plan = EpochPlan(5, 1, 16)
    whole = list(StreamInput(shards.root, cache, "train", options).batches(plan))
    following = list(StreamInput(shards.root, cache, "train", options).batches(replace(plan, epoch=2)))
    assert len(whole) == StreamInput(shards.root, cache, "train", options).steps_per_epoch(5, 1, 16, 1)
    steps = sorted({1, 2, 5, len(whole) // 2, len(whole) - 1, len(whole)})
    resumed = StreamInput(shards.root, cache, "train", options)
    resumed.start(plan, start_step=steps[-2])  # the workers' first pass is the resumed one
    assert _same_batches(list(resumed.batches(plan, steps[-2])), whole[steps[-2] :])
    for step in steps:  # persistent workers told another start step
        assert _same_batches(list(resumed.batches(plan, step)), whole[step:]), step
    assert _same_batches(list(resumed.batches(replace(plan, epoch=2))), following)  # the next epoch from step 0


def test_stream_resume_decodes_only_shards_still_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index, _ = prepare_shards(load_spec(DIGITS_SPEC), tmp_path, shard_size=16, max_samples=640)
    assert len(index.split("train").names) == 40
    read = []
    real = _Shards.read
    monkeypatch.setattr(_Shards, "read", lambda self, i, plan: read.append(i) or real(self, i, plan))
    options = DataOptions(mode="stream", workers=0, shuffle_buffer=16)
    plan = EpochPlan(0, 0, 16)
    whole = list(StreamInput(index.root, None, "train", options).batches(plan))
    assert len(read) == 40 and len(whole) == 40
    read.clear()
    rest = list(StreamInput(index.root, None, "train", options).batches(plan, 30))  # 480 samples skipped
    assert _same_batches(rest, whole[30:])
    # The ~8 shards not yet begun at step 30, and the few whose samples still wait in the buffer: not the 30 before.
    assert len(read) <= 15, read


# ---- training: killed mid-epoch, resumed, the same weights ----------------------------------------------------


def _kill_at(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> None:
    """The run dies right after writing its checkpoint at (epoch, step)."""
    real = train_module._save_checkpoint

    def save_then_die(path, state):
        real(path, state)
        if state["epoch"] == epoch and (state["partial"] or {}).get("steps") == step:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)


def _interrupted(cfg: TrainConfig, make_data, out: Path, monkeypatch, epoch: int, step: int):
    with monkeypatch.context() as patch:
        _kill_at(patch, epoch, step)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, make_data(), out, 8)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["partial"]["steps"]) == (epoch, step)  # it did stop mid-epoch
    return train(cfg, make_data(), out, 8)


@pytest.mark.parametrize(
    ("settings", "epoch", "step"),
    [
        ({"warmstart_epochs": 1}, 1, 2),  # in the second epoch, after the warm start
        ({"warmstart_epochs": 1}, 0, 1),  # in the warm start
        ({"warmstart_epochs": 1, "warmstart_before": True, "epochs": 2}, 1, 2),  # the budget's first epoch
    ],
)
def test_memory_mode_resumes_mid_epoch_to_identical_weights(tmp_path: Path, monkeypatch, settings, epoch, step) -> None:
    cfg = replace(TINY, checkpoints=CheckpointPolicy(every_steps=1, every_minutes=0), **settings)
    whole, history = train(cfg, _data(), tmp_path / "whole", 8)
    resumed, resumed_history = _interrupted(cfg, _data, tmp_path / "resumed", monkeypatch, epoch, step)
    _same_weights(whole, resumed)
    assert _without_clock(resumed_history) == _without_clock(history)  # each epoch recorded once, the same numbers


@pytest.mark.parametrize(("workers", "buffer"), [(1, 16), (1, 100), (2, 16), (2, 100)])
def test_stream_mode_resumes_mid_epoch_to_identical_weights(uneven, tmp_path: Path, monkeypatch, workers, buffer):
    shards, cache = uneven
    cfg = TrainConfig(
        model="test_resnet",
        objective=ObjectiveConfig(method="gendd"),
        epochs=2,
        batch_size=16,
        head=HeadSettings(token_dim=4, width=32, depth=1, diffusion_batch_mul=1),
        cpu=True,
        checkpoints=CheckpointPolicy(every_steps=3, every_minutes=0),
    )
    options = DataOptions(mode="stream", workers=workers, shuffle_buffer=buffer)

    def source() -> StreamInput:
        return StreamInput(shards.root, cache, "train", options)

    whole, history = train(cfg, source(), tmp_path / "whole", 8)
    assert [h["samples"] for h in history] == [shards.split("train").n] * 2
    resumed, resumed_history = _interrupted(cfg, source, tmp_path / "resumed", monkeypatch, 1, 9)
    _same_weights(whole, resumed)
    assert _without_clock(resumed_history) == _without_clock(history)


def test_when_checkpoints_are_written_changes_no_weight(tmp_path: Path, monkeypatch) -> None:
    cfg = replace(TINY, epochs=2, warmstart_epochs=0, checkpoints=NEVER)
    every_step = replace(cfg, checkpoints=CheckpointPolicy(every_steps=1, every_minutes=1e-9))
    assert every_step.fingerprint() == cfg.fingerprint()  # a checkpoint survives a change of interval
    reference, _ = train(cfg, _data(), tmp_path / "never", 8)
    saved = []
    real = train_module._save_checkpoint
    with monkeypatch.context() as patch:
        patch.setattr(
            train_module, "_save_checkpoint", lambda path, state: saved.append(state["partial"]) or real(path, state)
        )
        often, _ = train(every_step, _data(), tmp_path / "often", 8)
    assert len([p for p in saved if p]) == 2 * (3 - 1)  # 3 steps an epoch: 2 mid-epoch checkpoints each
    _same_weights(reference, often)


# ---- refusals ------------------------------------------------------------------------------------------------


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_checkpoint_of_other_code_is_set_aside_and_the_run_starts_over(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = replace(TINY, epochs=2, warmstart_epochs=0, checkpoints=NEVER)
    fresh, _ = train(cfg, _data(), tmp_path / "fresh", 8)
    train(replace(cfg, epochs=1), _data(), tmp_path, 8)
    theirs = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(checkpoint_module, "code_hash", lambda: "f" * 64)
    capsys.readouterr()
    student, history = train(cfg, _data(), tmp_path, 8)
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert note == [
        f"note: {tmp_path / 'checkpoint.pt'} was written by other code (gendd code {code_hash()[:12]}, this is "
        "ffffffffffff): starting over (kept as checkpoint.pt.stale)"
    ]
    assert (tmp_path / "checkpoint.pt.stale").read_bytes() == theirs  # nothing the user made is lost
    assert [h["epoch"] for h in history] == [1, 2] and _same(student, fresh)  # epoch 1 trained again, not resumed


@pytest.mark.parametrize("other", ["teacher", "settings", "fewer epochs"])
def test_checkpoint_of_another_run_is_never_resumed(tmp_path: Path, capsys, other: str) -> None:
    cfg = replace(TINY, epochs=2, warmstart_epochs=0, checkpoints=NEVER)
    ours = {"teacher checkpoint sha256": "a" * 64}
    train(cfg, _data(), tmp_path, 8, provenance=ours)
    now, provenance, why = cfg, ours, "was written with other settings"
    if other == "teacher":
        provenance, why = {"teacher checkpoint sha256": "b" * 64}, "was trained from teacher checkpoint sha256 aaaa"
    elif other == "settings":
        now = replace(cfg, lr=1e-2)
    else:
        now, why = replace(cfg, epochs=1), "holds 2 trained epochs, more than --epochs 1"
    capsys.readouterr()
    fresh, _ = train(now, _data(), tmp_path / "fresh", 8, provenance=provenance)
    student, history = train(now, _data(), tmp_path, 8, provenance=provenance)
    out = capsys.readouterr().out
    assert why in out and "starting over (kept as checkpoint.pt.stale)" in out
    assert len(history) == now.epochs and _same(student, fresh)


def test_code_hash_covers_every_module_of_the_package(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = tree_hash(tmp_path)
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")  # a module moved into a sub-package counts too
    assert tree_hash(tmp_path) != first
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code")
    assert tree_hash(tmp_path) == first and len(code_hash()) == 64 and code_hash() == code_hash()


def test_mid_epoch_checkpoint_of_another_loader_layout_is_set_aside(
    uneven, tmp_path: Path, monkeypatch, capsys
) -> None:
    shards, cache = uneven
    cfg = TrainConfig(
        model="test_resnet",
        objective=ObjectiveConfig(method="kd"),
        epochs=1,
        batch_size=16,
        cpu=True,
        checkpoints=CheckpointPolicy(every_steps=4, every_minutes=0),
    )

    def source(workers: int):
        return lambda: StreamInput(shards.root, cache, "train", DataOptions("stream", workers, 16))

    with monkeypatch.context() as patch:
        _kill_at(patch, 0, 4)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, source(1)(), tmp_path, 8)
    capsys.readouterr()
    train(cfg, source(2)(), tmp_path, 8)  # another layout: set aside, trained from the start
    assert "stopped within an epoch, reading with workers 1 (now 2)" in capsys.readouterr().out
    assert (tmp_path / "checkpoint.pt.stale").is_file()
    (tmp_path / "checkpoint.pt").unlink()  # the finished run's
    with monkeypatch.context() as patch:
        _kill_at(patch, 0, 4)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, source(1)(), tmp_path, 8)
    capsys.readouterr()
    train(cfg, source(0)(), tmp_path, 8)  # in-process reading orders batches as one worker does
    assert "resuming" in capsys.readouterr().out


def test_every_minutes_writes_a_checkpoint_after_the_interval(tmp_path: Path, monkeypatch) -> None:
    clock = iter(np.arange(0.0, 1e6, 100.0))  # every call: 100 s later
    monkeypatch.setattr(train_module, "monotonic", lambda: float(next(clock)))
    saved = []
    real = train_module._save_checkpoint
    monkeypatch.setattr(train_module, "_save_checkpoint", lambda path, state: saved.append(state) or real(path, state))
    cfg = replace(TINY, epochs=1, warmstart_epochs=0, checkpoints=CheckpointPolicy(every_minutes=3.0))
    train(cfg, _data(), tmp_path, 8)
    assert [s["partial"]["steps"] if s["partial"] else "end" for s in saved] == [2, "end"]


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_checkpoint_options_reach_the_training_config(stage: str, monkeypatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import pipeline.distill.distill
    import pipeline.teacher.teacher
    from stages.app import app

    seen = {}

    def capture(cfg):
        seen["cfg"] = cfg
        return {"final": {}, "epochs": 0, "train_seconds": 0.0} if stage == "distill" else {}

    monkeypatch.setattr(pipeline.teacher.teacher, "make_teacher", capture)
    monkeypatch.setattr(pipeline.distill.distill, "distill", capture)
    args = ["--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--checkpoint-every", "7"]
    result = CliRunner().invoke(app, [stage, *args, "--checkpoint-minutes", "0.5", "--no-resume"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.train.checkpoints == CheckpointPolicy(every_steps=7, every_minutes=0.5) and cfg.resume is False
    assert TrainConfig().checkpoints == CheckpointPolicy(every_steps=0, every_minutes=5.0)  # the documented default
    with pytest.raises(GenddError, match="--checkpoint-every must be >= 0"):
        CheckpointPolicy(every_steps=-1)


def test_a_second_set_aside_keeps_the_first(tmp_path: Path) -> None:
    cfg = replace(TINY, epochs=1, warmstart_epochs=0, checkpoints=NEVER)
    train(cfg, _data(), tmp_path, 8)
    first = (tmp_path / "checkpoint.pt").read_bytes()
    train(replace(cfg, lr=1e-2), _data(), tmp_path, 8)
    train(replace(cfg, lr=2e-2), _data(), tmp_path, 8)
    assert (tmp_path / "checkpoint.pt.stale").read_bytes() == first and (tmp_path / "checkpoint.pt.stale1").is_file()


def test_a_finished_run_with_another_loader_layout_is_another_run(uneven, tmp_path: Path, capsys) -> None:
    shards, cache = uneven
    cfg = TrainConfig(model="test_resnet", objective=ObjectiveConfig(method="kd"), epochs=1, batch_size=16, cpu=True)
    train(cfg, StreamInput(shards.root, cache, "train", DataOptions("stream", 1, 16)), tmp_path, 8)
    capsys.readouterr()
    _, history = train(cfg, StreamInput(shards.root, cache, "train", DataOptions("stream", 2, 16)), tmp_path, 8)
    assert "was trained, reading with workers 1 (now 2)" in capsys.readouterr().out and len(history) == 1


def test_a_finished_run_resumed_writes_its_live_metrics_again(tmp_path: Path) -> None:
    cfg = replace(TINY, epochs=1, warmstart_epochs=0, checkpoints=NEVER)
    seen: list[list[dict]] = []
    train(cfg, _data(), tmp_path, 8, on_epoch=lambda history: seen.append(list(history)))
    _, history = train(cfg, _data(), tmp_path, 8, on_epoch=lambda history: seen.append(list(history)))
    assert len(seen) == 2 and seen[1] == history == seen[0]  # nothing trained again, the curves rewritten
