"""Distillation of one student with one method, from the cached teacher; exports the student and its head."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from pipeline.cache.ensemble import Caches, cache_list, cache_metas, single
from pipeline.cache.store import cache_meta
from pipeline.config import POLICIES, DataOptions, TrainConfig
from pipeline.data.shards import load_index
from pipeline.devices import train_device
from pipeline.errors import GenddError
from pipeline.evaluate.refit import refit_readout
from pipeline.locations import check_readable
from pipeline.models import ModelCard, feature_dim, save_model
from pipeline.outputs import atomic_path, check_writable, write_json, write_text
from pipeline.train.loop import open_train_input, train
from pipeline.train.probe import val_probe_evaluator

STANDALONE_LOADER = '''"""Rebuild the distilled student with timm alone (no gendd needed): python load_student.py"""
import json, pathlib
import timm, torch
from safetensors.torch import load_file

here = pathlib.Path(__file__).parent
card = json.loads((here / "student.json").read_text())
model = timm.create_model(card["name"], num_classes=card["num_classes"], in_chans=card["in_chans"])
if card["small_stem"]:  # 3x3 stride-1 first conv, no first max-pool (as trained)
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    model.set_submodule(name, torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None))
    pool = next((n for n, m in model.named_modules() if isinstance(m, torch.nn.MaxPool2d)), None)
    if pool:
        model.set_submodule(pool, torch.nn.Identity())
model.load_state_dict(load_file(str(here / "student.safetensors")))
model.eval()
print(card["name"], "ready: input", card["in_chans"], "x", card["input_size"], "px")
'''


@dataclass(frozen=True)
class DistillConfig:
    """Inputs, output directory and training settings of one student x method."""

    shards: str | Path  # a local directory or a URL
    cache: Caches  # one cache, or several teachers' caches of one view plan (an ensemble)
    out: str | Path  # local only (a URL is refused before any work)
    train: TrainConfig
    resume: bool = True
    data: DataOptions = field(default_factory=DataOptions)
    work_dir: str | Path | None = None  # checkpoint.pt and live/ (default: `out`); DVC caches `out` only
    # After training, refit the student's own classifier on its frozen train-split features (logistic regression, as
    # `gendd evaluate --refit`): the readout of the features it learned, instead of the probe trained alongside them.
    refit_readout: bool = False


def _input_size(cfg: DistillConfig) -> int:
    if cfg.train.input_size:
        return cfg.train.input_size
    if cfg.cache is not None:  # the first teacher's (each teacher saw the crops at its own size)
        return int(cache_meta(cache_list(cfg.cache)[0], "train").teacher["input_size"])
    return int(load_index(cfg.shards).spec["image_size"])


def _check_cache_views(cfg: DistillConfig) -> None:
    metas = cache_metas(cfg.cache, "train")  # several: checked to share one view plan first
    for path, meta in zip(cache_list(cfg.cache), metas, strict=True):
        policy = meta.views.get("policy", {})
        if policy.get("kind") in POLICIES:
            continue
        raise GenddError(
            f"cache {path} uses view policy {policy.get('kind')!r}, which this gendd cannot replay; "
            "re-run gendd extract with one of " + ", ".join(POLICIES)
        )


def provenance(shards: str | Path, cache: Caches) -> dict:
    """What a student is trained from: the dataset spec, and the teacher checkpoint and feature cache it read (for
    several teachers: lists in the order of the caches, and the teachers' model names)."""
    record: dict = {}
    if metas := cache_metas(cache, "train"):
        sha = [meta.teacher["checkpoint_sha256"] for meta in metas]
        blobs = [hashlib.sha256(json.dumps(asdict(meta), sort_keys=True).encode()).hexdigest() for meta in metas]
        if len(metas) == 1:
            record["teacher checkpoint sha256"], record["feature cache"] = sha[0], blobs[0]
        else:
            record["teacher checkpoint sha256"], record["feature cache"] = sha, blobs
            record["teachers"] = [meta.teacher["name"] for meta in metas]
    index = load_index(shards)
    return record | {"dataset spec": index.spec_hash, "train shards": index.split("train").digest}


def live_logger(live_dir: Path) -> Callable[[list[dict]], None]:
    """Called after every epoch: rewrites `live_dir` (dvclive: metrics.json, plots/metrics/train/*.tsv) from the
    whole history, so a resumed run's curves stay whole and `dvc plots show` draws them while training runs."""
    state = {"off": False}

    def log(history: list[dict]) -> None:
        if state["off"]:
            return
        try:  # dvclive is optional (e.g. on a bare GPU host); train.json holds the same numbers
            from dvclive import Live

            with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
                for record in history:
                    for key, value in record.items():
                        if key != "epoch" and isinstance(value, (int, float)):
                            live.log_metric(f"train/{key}", value)
                    live.next_step()
        except Exception as err:  # dvclive trips on some git states (e.g. a repo without commits)
            state["off"] = True
            print(f"note: dvclive logging skipped ({type(err).__name__}: {err}); train.json holds the history")

    return log


def distill(cfg: DistillConfig) -> dict:
    """Train the student, then write student.safetensors/.json, head.safetensors, load_student.py, train.json."""
    for location in (cfg.shards, *cache_list(cfg.cache)):
        check_readable(location)
    cfg = replace(cfg, out=check_writable(cfg.out), cache=single(cfg.cache))
    work = check_writable(cfg.work_dir) if cfg.work_dir is not None else cfg.out
    _check_cache_views(cfg)
    size = _input_size(cfg)
    data = open_train_input(cfg.shards, cfg.cache, cfg.data, train_device(cfg.train.cpu))
    info = data.info
    evaluator = val_probe_evaluator(cfg.shards, size, info.mean, info.std, cfg.data)
    origin = provenance(cfg.shards, cfg.cache)
    started = time.perf_counter()
    live = live_logger(work / "live")
    student, history = train(cfg.train, data, work, size, evaluator, cfg.resume, origin, live)
    readout = None
    if cfg.refit_readout and PartialState().is_main_process:
        readout = refit_readout(student, cfg.shards, size, info.mean, info.std, options=cfg.data)
        if evaluator is not None:
            readout |= {"val_probe_top1": evaluator(student)["val_probe_top1"]}
        checked = f", val probe top-1 {readout['val_probe_top1']:.2f}%" if "val_probe_top1" in readout else ""
        print(f"readout refit on {readout['samples']} training images{checked}", flush=True)
    seconds = time.perf_counter() - started
    summary = {
        "method": cfg.train.objective.method,
        "student": cfg.train.model,
        "epochs": len(history),
        "train_seconds": sum(r["seconds"] for r in history),
        "wall_seconds": seconds,
        "final": history[-1] if history else {},
        **({"refit_readout": readout} if readout else {}),
    }
    if not PartialState().is_main_process:  # under `accelerate launch`, one process writes the outputs
        return summary
    in_chans = info.channels
    head_cfg = asdict(student.head.config) if student.head is not None else None
    card = ModelCard(
        name=cfg.train.model,
        num_classes=student.net.get_classifier().out_features,
        in_chans=in_chans,
        small_stem=cfg.train.small_stem,
        input_size=size,
        mean=info.mean,
        std=info.std,
        feature_dim=feature_dim(student.net, in_chans, size),
        extra={
            "method": cfg.train.objective.method,
            "head": head_cfg,
            "probe": cfg.train.objective.spec.probe,
            "probe_input": "condition" if student.probe_on_condition else "feature",
            "readout": "refit" if readout else "trained",
            "provenance": origin,
        },
    )
    if student.head is not None:  # before the student's card, which marks the export complete
        with atomic_path(cfg.out / "head.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in student.head.state_dict().items()}, str(tmp))
    save_model(student.net, card, cfg.out, "student")
    write_text(cfg.out / "load_student.py", STANDALONE_LOADER)
    write_json(cfg.out / "train.json", {**summary, "history": history})
    return summary
