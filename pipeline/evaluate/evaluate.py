"""Evaluation: top-1/top-5 through the probe (the student's own classifier) and the generative path; optionally a
refit linear probe on the frozen student features (does an accuracy gap come from the features or the readout?)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from pipeline.config import REFIT_SAMPLES, DataOptions, SamplingConfig
from pipeline.errors import GenddError, require
from pipeline.evaluate.predict import eval_batches, predict_batch
from pipeline.evaluate.refit import (
    REFIT_C,
    REFIT_PATHS,
    _require_train_split,
    fit_refit_probes,
    refit_logits,
    refit_train_features,
)
from pipeline.outputs import check_writable, save_figure, write_json
from pipeline.train.probe import Tally

if TYPE_CHECKING:
    from pipeline.cache.ensemble import Caches, TeacherEnsemble
    from pipeline.cache.store import FeatureCache

# What `dvc metrics show` / `dvc exp show` list per run: the accuracies, rounded; the rest is in details.json.
SHOWN_METRICS = ("probe_top1", "probe_top5", "generative_top1", "generative_top5", "teacher_top1")


SHOWN_METRICS += ("refit_top1", "refit_z_top1")  # only with --refit


def write_metrics(metrics: dict, out: str | Path, sampling: SamplingConfig | None) -> None:
    """`details.json`: every figure (per-class lists, timings, sampling settings; the report reads it), then
    `metrics.json`: the accuracies DVC shows, rounded to 0.01 points."""
    record = {**metrics, **({"sampling": asdict(sampling)} if sampling else {})}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / "details.json", record)
    write_json(Path(out) / "metrics.json", {k: round(metrics[k], 2) for k in SHOWN_METRICS if k in metrics})


def _plot_per_class(metrics: dict, class_names: list[str], path: Path) -> None:
    try:  # the plot is a convenience: a host without matplotlib (e.g. the GPU image) still gets the metrics JSON
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed; {path.name} skipped (metrics JSON holds the same numbers)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [k.removesuffix("_per_class") for k in metrics if k.endswith("_per_class")]
    fig, ax = plt.subplots(figsize=(max(6, len(class_names) * 0.6), 3.2))
    width = 0.8 / max(len(paths), 1)
    for j, name in enumerate(paths):
        values = [v if v is not None else 0.0 for v in metrics[f"{name}_per_class"]]
        ax.bar([i + j * width for i in range(len(values))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(class_names))], class_names, rotation=45, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _teacher_paths(logits: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """The teacher path(s) of a batch's cached logits: one teacher's; for several side by side, the ensemble's (log of
    the mean probability, as the students are distilled from) as `teacher`, each one's as `teacher1`, `teacher2`..."""
    from pipeline.train.losses import teacher_log_probs

    if logits.shape[-1] == num_classes:
        return {"teacher": logits}
    out = {"teacher": teacher_log_probs(logits.float(), num_classes)}
    return out | {f"teacher{i + 1}": part for i, part in enumerate(logits.split(num_classes, dim=-1))}


def _check_teachers(store: FeatureCache | TeacherEnsemble, card: dict, student_dir: Path) -> None:
    """Refuse caches of other teachers (or another order) than the student was distilled from."""
    was = (card["extra"].get("provenance") or {}).get("teacher checkpoint sha256")
    was = [was] if isinstance(was, str) else was  # one teacher's card records a string, several a list
    used = [c.meta.teacher["checkpoint_sha256"] for c in store.caches]
    if was is None or used == was:
        return
    raise GenddError(
        f"{store.path} was made by teacher(s) {', '.join(s[:16] for s in used)}, but {student_dir} was distilled from "
        f"{', '.join(s[:16] for s in was)}: evaluate with the cache(s) the student was distilled from, in that order"
    )


def run_evaluation(
    shards: str | Path,
    cache: Caches,
    student_dir: Path,
    out: str | Path,
    sampling: SamplingConfig | None,
    *,
    split: str = "val",
    batch_size: int = 256,
    device: str | None = None,
    data: DataOptions | None = None,
    refit: bool = False,
    refit_samples: int = REFIT_SAMPLES,
) -> dict:
    """Evaluate an exported student on a split: both paths, the teacher's own accuracy, per-class; write JSON + plot.
    With `refit`, also a linear probe fitted on the frozen features of the first `refit_samples` train samples
    (`refit_top1`; on the head's condition: `refit_z_top1`), scored in the same pass over the split."""
    from pipeline.cache.ensemble import cache_list, open_caches, readout, single
    from pipeline.data.shards import load_index
    from pipeline.distill.student import load_student
    from pipeline.locations import check_readable

    require(batch_size >= 1, "batch_size", ">= 1", batch_size)
    require(refit_samples >= 1, "refit_samples", ">= 1", refit_samples)
    for location in (shards, *cache_list(cache)):
        check_readable(location)
    out, cache = check_writable(out), single(cache)
    index = load_index(shards)
    if not index.labeled:
        raise GenddError(f"{shards} has no labels: accuracy needs a labelled {split} split")
    if refit:
        _require_train_split(index, shards)  # before any work
    student, card = load_student(student_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher_head, metrics = None, {"method": card["extra"]["method"], "student": card["name"]}
    if cache is not None:
        store = open_caches(cache, split, spec_hash=index.spec_hash)
        _check_teachers(store, card, student_dir)  # the generative path would sample another teacher
        teacher_head = tuple(torch.from_numpy(a).float() for a in readout(store))
        if store.teachers > 1:
            metrics["teachers"] = [c.meta.teacher["name"] for c in store.caches]
    use_sampling = sampling if student.head is not None and teacher_head is not None else None
    student = student.to(dev).eval()
    probes, refit_details, scoring_seconds = {}, {}, 0.0
    if refit:  # fitted first: the pass over the split then scores it without holding the split's features
        started = time.perf_counter()
        student = student.to(dev).eval()
        train, labels = refit_train_features(
            student, card, shards, refit_samples, batch_size, data or DataOptions(), dev
        )
        fit_started = time.perf_counter()
        probes = fit_refit_probes(train, labels, card["num_classes"])
        del train
        refit_details = {
            "refit_seconds": time.perf_counter() - started,  # + the scoring in the pass below
            "refit_fit_seconds": time.perf_counter() - fit_started,
            "refit_train_samples": len(labels),
            "refit_converged": all(converged for _, converged in probes.values()),
            "refit_C": REFIT_C,
        }
    n, batches = eval_batches(shards, cache, split, batch_size, data or DataOptions(), dev)
    teacher_names = ["teacher", *(f"teacher{i + 1}" for i in range(len(metrics.get("teachers", []))))]
    tallies = {name: Tally(card["num_classes"]) for name in ("probe", "generative", *teacher_names)}
    tallies |= {REFIT_PATHS[name]: Tally(card["num_classes"]) for name in probes}
    student = student.to(dev).eval()
    generator = torch.Generator(dev).manual_seed(use_sampling.seed) if use_sampling else None
    started = time.perf_counter()
    with tqdm(total=n, desc=f"evaluate {split}", unit="img", leave=False) as bar, torch.no_grad():
        for batch in batches:
            images = batch["images"].to(dev, non_blocking=True)
            logits = predict_batch(
                student,
                images,
                card["input_size"],
                tuple(card["mean"]),
                tuple(card["std"]),
                sampling=use_sampling,
                teacher_head=teacher_head,
                generator=generator,
                keep_features=bool(probes),
            )
            if probes:
                scoring = time.perf_counter()
                for name, (model, _) in probes.items():
                    x = logits.pop(name).cpu().numpy()
                    logits[REFIT_PATHS[name]] = refit_logits(model, x, card["num_classes"])
                logits.pop("condition", None)  # a head's condition, when only the raw features were refit
                scoring_seconds += time.perf_counter() - scoring
            if "teacher_logits" in batch:
                logits |= _teacher_paths(batch["teacher_logits"], card["num_classes"])
            for name, values in logits.items():
                tallies[name].add(values, batch["labels"])
            bar.update(len(images))
    metrics["eval_seconds"] = time.perf_counter() - started
    for name, tally in tallies.items():
        if tally.n:
            summary = tally.summary(name)
            if name not in ("probe", "generative"):  # teacher(s), refit: scalars only (the plot is the student's paths)
                summary.pop(f"{name}_per_class")
            metrics.update(summary)
    if "generative_top1" in metrics:
        metrics["probe_minus_generative"] = metrics["probe_top1"] - metrics["generative_top1"]
    if refit:  # refit_seconds: the train pass, the fit and the scoring; eval_seconds keeps the student's own pass
        metrics["eval_seconds"] -= scoring_seconds
        refit_details["refit_seconds"] += scoring_seconds
        metrics |= refit_details | {"refit_minus_probe": metrics["refit_top1"] - metrics["probe_top1"]}
    train_json = student_dir / "train.json"
    if train_json.is_file():
        metrics["train_seconds"] = json.loads(train_json.read_text())["train_seconds"]
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(metrics, out, use_sampling)
    names = list(index.spec.get("class_names") or [str(c) for c in range(card["num_classes"])])
    _plot_per_class(metrics, names, out / "per_class.png")
    return metrics
