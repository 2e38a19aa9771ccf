"""Extraction: the frozen teacher over every sample and K replayed views, written chunk by chunk into the cache.

One chunk = one image shard. Chunks already done are skipped (resume), ranks fill disjoint chunks (accelerate),
the next shards are decoded (in worker processes where cores allow) and the previous chunk compressed on a side
thread while the teacher runs.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.cache.meta import CacheMeta
from pipeline.cache.store import FeatureCacheWriter
from pipeline.config import ExtractConfig
from pipeline.data.shards import ShardData, ShardIndex, ShardSet, key_array, load_index
from pipeline.data.views import apply_views, decode_shard_with_views
from pipeline.errors import GenddError
from pipeline.models import features, linear_head, load_card, load_model


def decode_workers(requested: int) -> int:
    """Shard-decode processes to use: PNG decode and tar parsing hold the GIL, so on a fast GPU a single reader
    thread bounds extraction (measured: H100, resnet18 at 32 px, 0.30 of the bare forward). Auto: half the cores up
    to 8, none on a 2-core machine (the teacher needs them)."""
    if requested >= 0:
        return requested
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


def _decoder(workers: int) -> Executor:
    if workers == 0:
        return ThreadPoolExecutor(1)
    # fork where the OS has it (as torch's DataLoader does): a spawned worker re-imports the main script (torch
    # with it, ~3 s measured here), a fixed cost larger than a whole small extraction. The children only decode
    # PNGs and hash keys (numpy, PIL), never touch the parent's CUDA context.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def teacher_fingerprint(teacher_dir: Path) -> dict:
    """The teacher entry of a cache's attributes, from the teacher card."""
    card = load_card(teacher_dir, "teacher")
    keys = ("name", "feature_dim", "num_classes", "input_size", "mean", "std", "in_chans", "small_stem")
    return {"checkpoint_sha256": card["sha256"], **{k: card[k] for k in keys}}


class TeacherRunner:
    """The frozen teacher on a device: uint8 images + views -> (features, logits) in float32."""

    def __init__(self, teacher_dir: Path, device: torch.device, autocast_dtype: torch.dtype | None) -> None:
        model, self.card = load_model(teacher_dir, "teacher")
        self.model: nn.Module = model.to(device).eval().requires_grad_(False)
        head = linear_head(self.model)
        self.weight, self.bias = head.weight.detach().float(), head.bias.detach().float()
        self.device, self.autocast_dtype = device, autocast_dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher outputs of images (B, C, H, W) uint8 seen through views (B, 5); the head maps features to logits."""
        x = apply_views(
            images.to(self.device, non_blocking=True),
            views,
            self.card["input_size"],
            self.card["mean"],
            self.card["std"],
        )
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            feats = features(self.model, x).float()  # (B, D_T)
        return feats, feats @ self.weight.T + self.bias  # logits exactly as the stored head computes them


def _run_chunk(runner: TeacherRunner, images: torch.Tensor, views: np.ndarray, batch: int) -> tuple[np.ndarray, ...]:
    """Teacher outputs for every (sample, view) of a chunk, batched over flattened pairs."""
    n, k = views.shape[:2]
    flat_views = torch.from_numpy(views.reshape(n * k, 5)).to(runner.device)
    rows = torch.arange(n * k) // k  # pair p -> sample p // K
    feats, logits = [], []
    for start in range(0, n * k, batch):
        f, z = runner(images[rows[start : start + batch]], flat_views[start : start + batch])
        feats.append(f)
        logits.append(z)
    f_all = torch.cat(feats).view(n, k, -1).cpu().numpy()
    z_all = torch.cat(logits).view(n, k, -1).cpu().numpy()
    return f_all, z_all


def _meta(cfg: ExtractConfig, index: ShardIndex, split: str, n: int, k: int) -> CacheMeta:
    dataset = {"name": index.spec["name"], "spec_hash": index.spec_hash, "split": split, "n": n}
    if hashes := index.split(split).hashes:  # readers refuse the cache once a shard's content changes
        dataset["shard_sha256"] = list(hashes)
    views = {"K": k, "policy": cfg.policy.to_dict(), "seed": cfg.seed}
    return CacheMeta(teacher=teacher_fingerprint(cfg.teacher), dataset=dataset, views=views, codec=cfg.codec)


@dataclass(frozen=True)
class _SplitPlan:
    """One split's extraction: its shards, K views per sample, the open store and this rank's chunks still to do."""

    split: str
    shards: ShardSet
    image_size: int
    k: int
    keys: np.ndarray  # a key_array
    writer: FeatureCacheWriter
    todo: list[int]


def _plan_split(cfg: ExtractConfig, split: str, runner: TeacherRunner, rank: int = 0, world: int = 1) -> _SplitPlan:
    """Open (or resume) the split's store and list the chunks this rank still has to fill."""
    index = load_index(cfg.shards)
    shards = index.split(split)
    trained_on = (runner.card.get("extra") or {}).get("spec_hash", index.spec_hash)
    if trained_on != index.spec_hash:
        print(f"note: the teacher was trained on data spec {trained_on}, extracting spec {index.spec_hash}")
    k = cfg.num_views if split == "train" else cfg.eval_views
    keys, labels = shards.keys_and_labels()
    writer = FeatureCacheWriter.open(
        cfg.out,
        split,
        _meta(cfg, index, split, len(keys), k),
        chunk_size=index.shard_size,
        keys=keys,
        labels=labels.astype(np.int32),
        head_weight=runner.weight.cpu().numpy(),
        head_bias=runner.bias.cpu().numpy(),
        fmt=cfg.fmt,
    )
    todo = writer.pending_chunks(rank, world)
    return _SplitPlan(split, shards, int(index.spec["image_size"]), k, keys, writer, todo)


_Decoded = tuple[list[str], np.ndarray, np.ndarray, list[bytes] | None, np.ndarray]  # see decode_shard_with_views


def _decode_ahead(reader: Executor, cfg: ExtractConfig, plan: _SplitPlan, ahead: int) -> Iterator[tuple[int, _Decoded]]:
    """(chunk, decoded shard) in `plan.todo` order, with `ahead` shards in the reader while the caller works on one."""
    keep_png = cfg.fmt == "webdataset"

    def submit(i: int) -> Future[_Decoded]:
        path = str(plan.shards.path(i))
        return reader.submit(decode_shard_with_views, path, keep_png, plan.k, cfg.policy, cfg.seed, plan.image_size)

    queue = deque(submit(i) for i in plan.todo[:ahead])
    for pos, i in enumerate(plan.todo):
        decoded = queue.popleft().result()
        if pos + ahead < len(plan.todo):  # keep every decoder busy while the teacher works on this shard
            queue.append(submit(plan.todo[pos + ahead]))
        yield i, decoded


class _ChunkSaver:
    """Writes chunks on a side thread, so compression overlaps the next teacher chunk; at most one in flight."""

    def __init__(self, writer: FeatureCacheWriter, pool: ThreadPoolExecutor) -> None:
        self.writer, self.pool = writer, pool
        self.pending: Future | None = None

    def wait(self) -> None:
        """Block until the chunk in flight is written; raises its write error."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def submit(self, i: int, feats: np.ndarray, logits: np.ndarray, views: np.ndarray, png: list | None) -> None:
        self.wait()
        self.pending = self.pool.submit(self.writer.write_chunk, i, feats, logits, views, png)


def _extract_chunk(
    runner: TeacherRunner, plan: _SplitPlan, i: int, decoded: _Decoded, cfg: ExtractConfig, saver: _ChunkSaver
) -> int:
    """Run the teacher over chunk i's (sample, view) pairs and hand them to the saver; returns the sample count."""
    chunk_keys, images, labels, png, views = decoded
    data = ShardData(chunk_keys, torch.from_numpy(images), torch.from_numpy(labels), png)
    start, count = plan.shards.starts[i], plan.shards.counts[i]
    if not np.array_equal(key_array(data.keys), plan.keys[start : start + count]):
        raise GenddError(f"{plan.shards.path(i)} changed since the cache was started; delete {cfg.out} and re-run")
    feats, logits = _run_chunk(runner, data.images, views, cfg.batch_size)
    saver.submit(i, feats, logits, views, data.png)
    return len(data.keys)


@dataclass
class _Throughput:
    """(sample, view) pairs done since `started`; `first_chunk` = (seconds, pairs) when the first chunk was done."""

    started: float = field(default_factory=time.perf_counter)
    pairs: int = 0
    first_chunk: tuple[float, int] | None = None

    def add(self, pairs: int) -> None:
        self.pairs += pairs
        if self.first_chunk is None:  # the pipeline fill: first decode (and worker start) + one teacher chunk
            self.first_chunk = (time.perf_counter() - self.started, self.pairs)

    def rate(self) -> float:
        return self.pairs / (time.perf_counter() - self.started)

    def summary(self, plan: _SplitPlan) -> dict:
        """Counts and throughput of a finished split (`writer` included, for the caller to finalize)."""
        seconds = time.perf_counter() - self.started
        fill_s, fill_pairs = self.first_chunk or (0.0, 0)
        rest_s = seconds - fill_s
        return {
            "split": plan.split,
            "n": len(plan.keys),
            "K": plan.k,
            "chunks_written": len(plan.todo),
            "views": self.pairs,
            "seconds": seconds,
            "views_per_s": self.pairs / seconds if seconds > 0 else 0.0,
            "first_chunk_s": fill_s,
            # after the first chunk: the rate a long extraction converges to (None with a single chunk)
            "steady_views_per_s": (self.pairs - fill_pairs) / rest_s if len(plan.todo) > 1 and rest_s > 0 else None,
            "writer": plan.writer,
        }


def extract_split(
    cfg: ExtractConfig, split: str, runner: TeacherRunner, rank: int = 0, world: int = 1, reader: Executor | None = None
) -> dict:
    """Fill this rank's missing chunks of one split; returns counts and throughput. `reader` decodes shards (a pool
    shared by the splits); without one the split starts its own."""
    plan = _plan_split(cfg, split, runner, rank, world)
    done = _Throughput()
    workers = decode_workers(cfg.workers)
    with ExitStack() as stack:
        if reader is None:
            reader = stack.enter_context(_decoder(workers))
        saver = _ChunkSaver(plan.writer, stack.enter_context(ThreadPoolExecutor(1)))
        total = sum(plan.shards.counts[i] for i in plan.todo) * plan.k
        bar = tqdm(total=total, desc=f"extract {split}", unit="view", leave=False, disable=rank != 0)
        # one shard in decode per worker while the teacher works
        for i, decoded in _decode_ahead(reader, cfg, plan, ahead=max(1, workers)):
            pairs = _extract_chunk(runner, plan, i, decoded, cfg, saver) * plan.k
            done.add(pairs)
            bar.update(pairs)
            bar.set_postfix(views_per_s=f"{done.rate():.0f}")
        saver.wait()
        bar.close()
    return done.summary(plan)


def extract(cfg: ExtractConfig) -> list[dict]:
    """Extract every requested split (resumable, multi-process under `accelerate launch`); marks stores complete."""
    from pipeline.devices import make_accelerator
    from pipeline.locations import check_readable
    from pipeline.outputs import check_out_writable

    check_readable(cfg.shards)
    teacher_fingerprint(cfg.teacher)  # a missing or damaged teacher is refused before the output folder is made
    cfg = replace(cfg, out=check_out_writable(cfg.out))
    # The decode processes start first and serve every split: forked before the teacher and CUDA are loaded, the
    # children are cheaper to fork and hold no CUDA state; one pool saves a second start-up for the val split.
    with _decoder(decode_workers(cfg.workers)) as reader:
        _start_workers(reader)
        accelerator = make_accelerator(cfg.mixed_precision, cfg.cpu)
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        runner = TeacherRunner(cfg.teacher, accelerator.device, dtypes.get(cfg.mixed_precision))
        results = []
        for split in cfg.splits:
            result = extract_split(cfg, split, runner, accelerator.process_index, accelerator.num_processes, reader)
            accelerator.wait_for_everyone()
            writer = result.pop("writer")
            result["complete"] = writer.finalize() if accelerator.is_main_process else None
            results.append(result)
    return results


def _start_workers(reader: Executor) -> None:
    """Fork a process pool's workers now (a fork pool starts all of them at its first task)."""
    if isinstance(reader, ProcessPoolExecutor):
        reader.submit(int).result()
