"""A refit linear probe: multinomial logistic regression fitted afresh on the frozen student features of the
train split and scored on the evaluated split. If it beats the student's own probe by much, the readout lost accuracy
that the features hold."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import REFIT_SAMPLES, DataOptions
from pipeline.errors import GenddError
from pipeline.evaluate.predict import eval_batches, predict_batch

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
    from pipeline.data.shards import load_index

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
