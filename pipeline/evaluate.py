"""Evaluation: top-1/top-5 through the probe (the student's own classifier) and the generative path; optionally a
refit linear probe on the frozen student features (does an accuracy gap come from the features or the readout?)."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import REFIT_SAMPLES, DataOptions, SamplingConfig
from pipeline.errors import GenddError, require
from pipeline.models import features
from pipeline.outputs import check_writable, save_figure, write_json
from pipeline.views import IDENTITY, apply_views


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percentage of rows whose label is among the k largest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hits.float().mean() * 100)


def identity_features(
    student: nn.Module, images: torch.Tensor, input_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Frozen student features (B, D_S) of uint8 images (B, C, H, W) through the identity view (no augmentation)."""
    views = torch.tensor([IDENTITY], device=images.device).expand(len(images), 5)
    return features(student.net, apply_views(images, views, input_size, mean, std))


@torch.no_grad()
def predict_batch(
    student: nn.Module,
    images: torch.Tensor,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    sampling: SamplingConfig | None = None,
    teacher_head: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    keep_features: bool = False,
) -> dict[str, torch.Tensor]:
    """Probe logits of uint8 images (B, C, H, W) on the student's device through the identity view and, when
    `sampling` is set, generative-path logits (teacher head applied to the averaged generated teacher features).
    With `keep_features`, also the frozen features (`features`, (B, D_S)) and, for a student with a head, its
    normalised condition (`condition`): what the refit probe reads; they are not logits."""
    feats = identity_features(student, images, input_size, mean, std)  # (B, D_S)
    out = {"probe": student.probe(feats).float()}
    if keep_features:
        out["features"] = feats.float()
        if student.head is not None:
            out["condition"] = student.head.condition(feats).float()
    if sampling is not None and student.head is not None and teacher_head is not None:
        z = student.head.condition(feats)
        f_t = student.head.sample(
            z,
            n_samples=sampling.n_samples,
            cfg_scale=sampling.cfg_scale,
            sampler=sampling.sampler,
            steps=sampling.steps,
            spacing=sampling.spacing,
            generator=generator,
        )
        weight, bias = (t.to(images.device) for t in teacher_head)
        out["generative"] = (f_t @ weight.T + bias).float()
    return out


def predict(
    student: nn.Module,
    images: torch.Tensor,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    device: torch.device,
    batch_size: int = 256,
    sampling: SamplingConfig | None = None,
    teacher_head: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Logits of every path for images held in memory (see `predict_batch`), on the host."""
    student = student.to(device).eval()
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling else None
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(device)
        out = predict_batch(
            student, chunk, input_size, mean, std, sampling=sampling, teacher_head=teacher_head, generator=generator
        )
        for name, logits in out.items():
            parts.setdefault(name, []).append(logits.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


class Tally:
    """Running top-1/top-5 and per-class hits of one prediction path: evaluation memory does not grow with N."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes, self.n, self.top1, self.top5 = num_classes, 0, 0, 0
        self.class_hits = torch.zeros(num_classes, dtype=torch.int64)
        self.class_total = torch.zeros(num_classes, dtype=torch.int64)

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch."""
        logits, labels = logits.float().cpu(), labels.cpu().long()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 = top[:, 0] == labels
        self.n += len(labels)
        self.top1 += int(hit1.sum())
        self.top5 += int((top == labels[:, None]).any(dim=1).sum())
        self.class_total += torch.bincount(labels, minlength=self.num_classes)[: self.num_classes]
        self.class_hits += torch.bincount(labels[hit1], minlength=self.num_classes)[: self.num_classes]

    def summary(self, path: str) -> dict:
        """`<path>_top1`, `<path>_top5` (percent) and `<path>_per_class` (NaN for classes never seen)."""
        per_class = [
            float(h * 100 / t) if t else float("nan") for h, t in zip(self.class_hits, self.class_total, strict=True)
        ]
        n = max(self.n, 1)
        return {
            f"{path}_top1": self.top1 * 100 / n,
            f"{path}_top5": self.top5 * 100 / n,
            f"{path}_per_class": per_class,
        }


def eval_batches(
    shards: str | Path,
    cache: str | Path | None,
    split: str,
    batch_size: int,
    options: DataOptions,
    device: torch.device,
) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    """(samples, batches) of a split for evaluation: images, labels and (with a cache) the teacher's view-0 logits,
    held in memory or streamed (`options.mode`; auto: estimated and printed)."""
    from pipeline.data import choose_mode, footprint
    from pipeline.shards import key_array, load_index, load_split
    from pipeline.store import open_cache
    from pipeline.stream import stream_eval_batches

    index = load_index(shards)
    store = None
    if cache is not None:
        store = open_cache(cache, split, spec_hash=index.spec_hash, shards=index.split(split))
    sizes = footprint(index, split, 1, 0, store.num_classes if store else 0)
    mode, line = choose_mode(options.mode, sizes, device, split)
    print(line, flush=True)
    if mode == "stream":
        _, batches = stream_eval_batches(shards, cache, split, batch_size, options.workers, device.type == "cuda")
        return index.split(split).n, batches
    data = load_split(index.split(split))
    logits = None
    if store is not None:
        if not np.array_equal(store.keys, key_array(data.keys)):
            raise GenddError(f"cache {cache} was extracted from other samples than {shards}; re-run gendd extract")
        logits = torch.cat(
            [torch.from_numpy(store.read_chunk(i, dtype=np.float16)["logits"][:, 0]) for i in range(store.n_chunks)]
        )

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(data.labels), batch_size):
            rows = slice(start, start + batch_size)
            batch = {"images": data.images[rows], "labels": data.labels[rows]}
            yield batch | ({"teacher_logits": logits[rows]} if logits is not None else {})

    return len(data.labels), batches()


def val_probe_evaluator(
    shards: str | Path, size: int, mean: tuple, std: tuple, options: DataOptions | None = None
) -> Callable[[nn.Module], dict] | None:
    """A per-epoch check: probe top-1 of a Student on the val split (None when there is no labelled val split); the
    split is held in memory or streamed at every call, as `options.mode` says."""
    from pipeline.shards import load_index, load_split

    index = load_index(shards)
    if "val" not in index.splits or not index.labeled:
        return None
    from pipeline.data import choose_mode, footprint

    options = options or DataOptions(mode="memory")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode, line = choose_mode(options.mode, footprint(index, "val", 0, 0, 0), device, "val")
    if options.mode == "auto":
        print(line, flush=True)
    held = load_split(index.split("val")) if mode == "memory" else None
    num_classes = int(index.spec["num_classes"])
    streamed = None
    if held is None:  # made now, before training: its loader workers start while the trainer is still small
        from pipeline.stream import stream_eval_batches

        streamed = stream_eval_batches(shards, None, "val", 256, options.workers, device.type == "cuda")[1]

    def evaluate_fn(student: nn.Module) -> dict:
        was_training = student.training
        student = student.to(device).eval()
        tally = Tally(num_classes)
        batches = streamed
        if held is not None:
            batches = (
                {"images": held.images[i : i + 256], "labels": held.labels[i : i + 256]}
                for i in range(0, len(held.labels), 256)
            )
        with torch.no_grad():
            for batch in batches:
                tally.add(predict_batch(student, batch["images"].to(device), size, mean, std)["probe"], batch["labels"])
        student.train(was_training)
        return {"val_probe_top1": tally.summary("probe")["probe_top1"]}

    return evaluate_fn


# ---- refit linear probe -------------------------------------------------------------------------------------------
# A multinomial logistic regression fitted afresh on the frozen student features of the train split and scored on the
# evaluated split: if it beats the student's own (trained) probe by much, the readout lost accuracy its features hold.
REFIT_C = 1.0  # inverse L2 strength on standardised features; fixed, so runs compare
REFIT_MAX_ITER = 1000  # lbfgs iterations: ~10-30 suffice on 10k x 512 features, the cap only guards odd cases
REFIT_PATHS = {"features": "refit", "condition": "refit_z"}  # what predict_batch keeps -> metric prefix


def _require_train_split(index, shards: str | Path) -> None:
    if "train" not in index.splits:
        raise GenddError(
            f"{shards}: --refit fits its probe on the train split, but the shards have none (have "
            f"{', '.join(index.splits)}); re-run gendd prepare with a spec that defines one, or drop --refit"
        )


def refit_train_features(
    student: nn.Module,
    card: dict,
    shards: str | Path,
    limit: int,
    batch_size: int,
    options: DataOptions,
    device: torch.device,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Frozen identity-view features of the first `limit` samples of the train split (and the head's condition, for a
    student with one), keyed as `predict_batch(keep_features=True)` keys them, rows in split order; and their labels.

    Memory: unlike the rest of evaluation (running tallies), this holds min(limit, N_train) x D_S float32 per input
    (10 000 x 512: 20 MB), so it grows with the split up to `limit` (--refit-samples); images are read in batches, in
    memory or streamed as `options` says, like the evaluated split."""
    from pipeline.shards import load_index

    _require_train_split(load_index(shards), shards)
    n, batches = eval_batches(shards, None, "train", batch_size, options, device)
    take = min(n, limit)
    parts: dict[str, list[np.ndarray]] = {}
    labels, rows, seen, offset = [], [], 0, 0
    size, mean, std = card["input_size"], tuple(card["mean"]), tuple(card["std"])
    with tqdm(total=take, desc="refit: train features", unit="img", leave=False) as bar, torch.no_grad():
        for batch in batches:
            count = len(batch["labels"])
            # memory batches come in split order; streamed ones carry their row (workers interleave shards)
            where = torch.as_tensor(batch["index"]) if "index" in batch else torch.arange(offset, offset + count)
            offset += count
            keep = where < take
            if not bool(keep.any()):
                continue
            images = batch["images"][keep].to(device, non_blocking=True)
            out = predict_batch(student, images, size, mean, std, keep_features=True)
            for name in REFIT_PATHS:
                if name in out:
                    parts.setdefault(name, []).append(out[name].cpu().numpy())
            labels.append(torch.as_tensor(batch["labels"])[keep].numpy())
            rows.append(where[keep].numpy())
            seen += int(keep.sum())
            bar.update(int(keep.sum()))
            if seen >= take:
                break
    del batches  # a stream's loader workers end here, before the evaluated split starts its own
    if not seen:
        raise GenddError(f"{shards}: the train split is empty: --refit needs samples to fit on; drop --refit")
    order = np.argsort(np.concatenate(rows), kind="stable")  # split order whatever the mode: the same fit
    y = np.concatenate(labels)[order].astype(np.int64)
    if (y < 0).any():
        raise GenddError(
            f"{shards}: the train split has unlabelled samples, but --refit fits its probe on train labels; "
            "prepare the shards from a labelled spec, or drop --refit"
        )
    return {name: np.concatenate(values)[order] for name, values in parts.items()}, y


def fit_refit_probes(train: dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> dict[str, tuple]:
    """Per input: standardise (statistics of train) + multinomial logistic regression (lbfgs: deterministic, no seed);
    returns {input: (pipeline, converged)}."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    present = np.unique(labels)
    if len(present) < 2:
        raise GenddError(
            f"--refit: the first {len(labels)} train samples hold only class {present.tolist()}: a probe needs two "
            "or more; raise --refit-samples"
        )
    if len(present) < num_classes:
        print(
            f"note: --refit: the first {len(labels)} train samples hold {len(present)} of {num_classes} classes; "
            "the refit probe never predicts the others (raise --refit-samples)",
            flush=True,
        )
    probes = {}
    for name, x in train.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(C=REFIT_C, max_iter=REFIT_MAX_ITER))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x, labels)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:  # any other warning is shown as usual
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not converged:
            print(f"note: --refit: the {REFIT_PATHS[name]} probe stopped at {REFIT_MAX_ITER} iterations unconverged")
        probes[name] = (model, converged)
    return probes


def refit_readout(
    student: nn.Module,
    shards: str | Path,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    options: DataOptions | None = None,
    limit: int = REFIT_SAMPLES,
    device: torch.device | None = None,
) -> dict:
    """Replace the student's own classifier by the refit probe (the same fit as `--refit` in evaluation) on the input
    it reads (the feature, or the condition), the standardisation folded into the linear layer: the exported student
    stays a plain timm network. Returns what the fit did (samples, convergence, seconds)."""
    started = time.perf_counter()
    device = device or torch.device("cpu")
    card = {"input_size": input_size, "mean": mean, "std": std}
    student = student.to(device).eval()
    train, labels = refit_train_features(student, card, shards, limit, 256, options or DataOptions(), device)
    name = "condition" if student.probe_on_condition else "features"
    classifier = student.net.get_classifier()
    (model, converged) = fit_refit_probes({name: train[name]}, labels, classifier.out_features)[name]
    scaler, logistic = model[0], model[-1]
    coef, intercept = logistic.coef_, logistic.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn keeps one logit; split it evenly (same argmax and softmax)
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros(tuple(classifier.weight.shape))
    bias = np.full(classifier.out_features, -1e4)  # a class the fit never saw is never predicted
    weight[logistic.classes_] = coef / scaler.scale_  # (x - mu) / s @ c.T + b  ==  x @ (c / s).T + (b - c @ mu / s)
    bias[logistic.classes_] = intercept - (coef * scaler.mean_ / scaler.scale_).sum(axis=1)
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(weight))
        classifier.bias.copy_(torch.from_numpy(bias))
    return {"input": name, "samples": len(labels), "converged": converged, "seconds": time.perf_counter() - started}


def refit_logits(model, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """(B, num_classes) log-probabilities of a fitted refit probe; -inf for classes train never showed it."""
    out = torch.full((len(x), num_classes), -torch.inf)
    out[:, torch.as_tensor(model.classes_)] = torch.from_numpy(model.predict_log_proba(x)).float()
    return out


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


def run_evaluation(
    shards: str | Path,
    cache: str | Path | None,
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
    from pipeline.locations import check_readable
    from pipeline.shards import load_index
    from pipeline.store import open_cache
    from pipeline.train import load_student

    require(batch_size >= 1, "batch_size", ">= 1", batch_size)
    require(refit_samples >= 1, "refit_samples", ">= 1", refit_samples)
    for location in (shards, cache):
        if location is not None:
            check_readable(location)
    out = check_writable(out)
    index = load_index(shards)
    if not index.labeled:
        raise GenddError(f"{shards} has no labels: accuracy needs a labelled {split} split")
    if refit:
        _require_train_split(index, shards)  # before any work
    student, card = load_student(student_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher_head, metrics = None, {"method": card["extra"]["method"], "student": card["name"]}
    if cache is not None:
        store = open_cache(cache, split, spec_hash=index.spec_hash)
        trained_from = (card["extra"].get("provenance") or {}).get("teacher checkpoint sha256")
        used = store.meta.teacher["checkpoint_sha256"]
        if trained_from is not None and used != trained_from:  # the generative path would sample another teacher
            raise GenddError(
                f"{store.path} was made by teacher {used[:16]}, but {student_dir} was distilled from teacher "
                f"{trained_from[:16]}: evaluate with the cache the student was distilled from"
            )
        teacher_head = (torch.from_numpy(store.head_weight).float(), torch.from_numpy(store.head_bias).float())
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
    tallies = {name: Tally(card["num_classes"]) for name in ("probe", "generative", "teacher")}
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
                logits["teacher"] = batch["teacher_logits"]
            for name, values in logits.items():
                tallies[name].add(values, batch["labels"])
            bar.update(len(images))
    metrics["eval_seconds"] = time.perf_counter() - started
    for name, tally in tallies.items():
        if tally.n:
            summary = tally.summary(name)
            if name not in ("probe", "generative"):  # teacher, refit: scalars only (the plot is the student's paths)
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
