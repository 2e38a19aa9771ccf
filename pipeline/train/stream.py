"""The stream mode: shards and their cache chunks read per epoch, so memory does not grow with the dataset.

Per epoch the shard order is a permutation from (seed, epoch); rank r takes every world-th shard of it and loader
worker w every workers-th shard of those, so every sample is read once per epoch by exactly one worker. A worker
reads a shard's image tar and the cache chunk of the same samples (chunks are aligned with shards), checks that
their keys agree, picks each sample's view from `view_plan`, and draws batches at random from a buffer of at least
`shuffle_buffer` samples. Memory per worker: one decoded shard plus the buffer, whatever the split's size.

Mid-epoch resume: a worker's batches are a function of (seed, epoch, rank, worker), and the DataLoader takes them from
the workers round-robin, so the batches each worker delivered in an epoch's first s steps, and the worker it asks
next, follow from the shard sizes (`delivered`). A worker resuming at step s replays its shuffle buffer's draws on
sample positions alone (the draws depend only on the buffer's length), decodes just the shards whose samples are
still waiting, then goes on as if never interrupted (the idea of mosaicml-streaming's deterministic resume).

Uneven shard counts: ranks (and workers) may get a different number of samples in an epoch; nothing is dropped or
repeated. Under DDP the training loop joins uneven inputs (`Accelerator.join_uneven_inputs`): a rank that runs out
of batches first shadows the others' gradient all-reduces, so no rank waits forever.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataOptions
from pipeline.data.shards import ShardSet, decode_pngs, decode_shard, load_index, shard_count_error
from pipeline.errors import GenddError
from pipeline.train.input import EpochPlan, InputInfo, fresh_views, stats_chunks, stream_workers, view_plan

if TYPE_CHECKING:
    from pipeline.cache.ensemble import Caches

_ERROR = "error"  # a worker's GenddError travels to the main process as a batch with this key


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard order: a permutation from (seed, epoch) only."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n_shards)


def worker_shards(n_shards: int, plan: EpochPlan, worker: int, workers: int) -> list[int]:
    """Shards of one loader worker of one rank in an epoch: disjoint across (rank, worker), together all of them."""
    mine = shard_order(n_shards, plan.seed, plan.epoch)[plan.rank :: plan.world]
    return [int(i) for i in mine[worker::workers]]


def worker_batches(counts: list[int], plan: EpochPlan, workers: int) -> list[int]:
    """Batches each loader worker of a rank yields in an epoch: ceil(its samples / batch) (only the last is short)."""
    workers = max(workers, 1)
    samples = [sum(counts[i] for i in worker_shards(len(counts), plan, w, workers)) for w in range(workers)]
    return [math.ceil(n / plan.batch_size) for n in samples]


def delivered(batches: list[int], steps: int) -> tuple[list[int], int]:
    """(batches each worker has delivered, the worker asked next) after a pass's first `steps`: the DataLoader asks
    the workers in turn (0, 1, ...; persistent ones too), skipping those that have run out. A pass always starts at
    worker 0, so a resumed one hands worker i the part of worker (i + next) % workers."""
    taken, left, last = [0] * len(batches), steps, -1
    while left > 0:
        active = [w for w, n in enumerate(batches) if taken[w] < n]
        if not active:
            break
        rounds = min(min(batches[w] - taken[w] for w in active), left // len(active))
        if rounds == 0:  # a partial round: the first `left` active workers, in turn
            for w in active[:left]:
                taken[w] += 1
            last = active[left - 1]
            break
        for w in active:
            taken[w] += rounds
        left, last = left - rounds * len(active), active[-1]
    return taken, (last + 1) % max(len(batches), 1)


class _Shards:
    """One split's image shards and (optionally) the cache chunks aligned with them; reads one shard's samples."""

    def __init__(self, shards: ShardSet, cache, image_size: int) -> None:
        self.set, self.cache, self.image_size = shards, cache, image_size

    def read(self, i: int, plan: EpochPlan | None) -> dict[str, np.ndarray]:
        """Shard i decoded, with its view per sample (plan None: the identity view, view 0) and cached targets."""
        from pipeline.data.shards import key_array

        location = self.set.path(i)
        start, count = self.set.starts[i], self.set.counts[i]
        if self.cache is not None and self.cache.holds_images:
            return self._read_from_cache(i, plan, start, count)
        keys, images, labels, _ = decode_shard(location)
        if len(keys) != count:
            raise shard_count_error(self.set, i, len(keys))
        index = np.arange(start, start + count, dtype=np.int64)
        k = self.cache.K if self.cache is not None else 0
        view = view_plan(plan.seed, plan.epoch, index, k) if plan is not None and k else np.zeros(count, np.int64)
        out = {"images": images, "labels": labels, "index": index, "view": view}
        if self.cache is None:
            ident = np.tile(np.array([[0.0, 0.0, 1.0, 1.0, 0.0]], np.float32), (count, 1))
            out["views"] = fresh_views(keys, plan, self.image_size).astype(np.float32) if plan else ident
            return out
        if not np.array_equal(key_array(keys), self.cache.keys[start : start + count]):
            raise GenddError(
                f"{location} holds other samples than chunk {i} of the cache {self.cache.path}: the cache does not "
                "match the shards; re-run gendd extract with these shards"
            )
        chunk = self.cache.read_chunk(i, dtype=np.float16)
        return out | self._targets(chunk, view)

    @staticmethod
    def _targets(chunk: dict[str, np.ndarray], view: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.arange(len(view))
        return {
            "views": chunk["views"][rows, view],
            "teacher_features": chunk["features"][rows, view],
            "teacher_logits": chunk["logits"][rows, view],
        }

    def _read_from_cache(self, i: int, plan: EpochPlan | None, start: int, count: int) -> dict[str, np.ndarray]:
        """Shard i from a cache whose tars hold the images too (webdataset): one object per shard, not two (the
        image shard is not read; its PNG bytes are in the cache tar, so the pixels are the same)."""
        pngs: list[bytes] = []
        chunk = self.cache.read_chunk(i, dtype=np.float16, images=pngs)
        if len(pngs) != count:
            raise shard_count_error(self.set, i, len(pngs))
        index = np.arange(start, start + count, dtype=np.int64)
        view = view_plan(plan.seed, plan.epoch, index, self.cache.K) if plan is not None else np.zeros(count, np.int64)
        images, labels = decode_pngs(pngs), chunk["labels"].astype(np.int64)
        return {"images": images, "labels": labels, "index": index, "view": view} | self._targets(chunk, view)


class _Buffer:
    """Samples of several shards waiting to be batched; batches are drawn from it at random (a shuffle buffer)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.rows = rng, []  # rows: one dict of per-sample arrays each

    def add(self, block: dict[str, np.ndarray]) -> None:
        # Copies, not views: a view would keep its whole decoded shard alive while any of its samples waits here,
        # and with random draws several shards would (measured: memory growing with the number of shards).
        self.rows.extend({name: value[r].copy() for name, value in block.items()} for r in range(len(block["index"])))

    def take(self, size: int) -> dict[str, np.ndarray]:
        """`size` random samples, removed from the buffer, stacked per field."""
        taken = self.draw(size)
        return {name: np.stack([row[name] for row in taken]) for name in taken[0]}

    def draw(self, size: int) -> list:
        """`size` random rows, removed from the buffer. Which rows, and the order left behind, depend only on the
        number of rows and the generator: a replay on placeholder rows ends in the same state (a resume)."""
        picks = sorted(self.rng.choice(len(self.rows), size=min(size, len(self.rows)), replace=False), reverse=True)
        taken = []
        for p in picks:  # swap-remove: O(1) per sample
            taken.append(self.rows[p])
            self.rows[p] = self.rows[-1]
            self.rows.pop()
        return taken


class ShardStream(IterableDataset):
    """One rank's training samples of an epoch, as shuffled batches (DataLoader with batch_size=None). The epoch and
    the step it starts at are read from values shared with the loader workers, so persistent workers serve every
    epoch of a run, a resumed one from its step."""

    def __init__(self, source: _Shards, plan: EpochPlan, workers: int, shuffle_buffer: int, epoch, step) -> None:
        super().__init__()
        self.source, self.plan, self.workers, self.shuffle_buffer = source, plan, max(workers, 1), shuffle_buffer
        # multiprocessing.Value("q") each: set by the trainer before each epoch's iteration
        self.epoch, self.step = epoch, step

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        plan = replace(self.plan, epoch=int(self.epoch.value))
        taken, first = delivered(worker_batches(self.source.set.counts, plan, self.workers), int(self.step.value))
        worker = ((info.id if info is not None else 0) + first) % self.workers  # the part this process serves
        buffer = _Buffer(np.random.default_rng([plan.seed, plan.epoch, plan.rank, worker]))
        full, skip = self.shuffle_buffer + plan.batch_size, taken[worker]
        try:
            shards = worker_shards(len(self.source.set.names), plan, worker, self.workers)
            rest = self._fast_forward(buffer, shards, skip, plan) if skip else shards
            while len(buffer.rows) >= full:  # a resume may stop where the buffer is still full
                yield buffer.take(plan.batch_size)
            for i in rest:
                buffer.add(self.source.read(i, plan))
                while len(buffer.rows) >= full:
                    yield buffer.take(plan.batch_size)
            while buffer.rows:
                yield buffer.take(plan.batch_size)
        except GenddError as err:  # one line in the main process, not a worker traceback
            yield {_ERROR: str(err)}

    def _fast_forward(self, buffer: _Buffer, shards: list[int], skip: int, plan: EpochPlan) -> list[int]:
        """Put `buffer` where it is after this worker's first `skip` batches, without decoding what they held: the
        draws are replayed on (shard, row) placeholders, then only shards with rows still waiting are read. Returns
        the shards left to read."""
        counts, full, done, rest = self.source.set.counts, self.shuffle_buffer + plan.batch_size, 0, []
        for j, i in enumerate(shards):
            buffer.rows.extend((j, r) for r in range(counts[i]))
            while len(buffer.rows) >= full and done < skip:
                buffer.draw(plan.batch_size)
                done += 1
            if done == skip:
                rest = shards[j + 1 :]
                break
        while buffer.rows and done < skip:  # the skipped batches reach into the final drain
            buffer.draw(plan.batch_size)
            done += 1
        waiting: dict[int, list[tuple[int, int]]] = {}  # shard position -> (slot in the buffer, row in the shard)
        for slot, (j, r) in enumerate(buffer.rows):
            waiting.setdefault(j, []).append((slot, r))
        for j, slots in sorted(waiting.items()):  # one decoded shard at a time, as in a normal pass
            block = self.source.read(shards[j], plan)
            for slot, r in slots:
                buffer.rows[slot] = {name: value[r].copy() for name, value in block.items()}
        return rest


class _OrderedShards(IterableDataset):
    """Every sample of a split once, identity view, in batches within each shard (evaluation)."""

    def __init__(self, source: _Shards, batch_size: int, workers: int) -> None:
        super().__init__()
        self.source, self.batch_size, self.workers = source, batch_size, max(workers, 1)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        try:
            for i in range(worker, len(self.source.set.names), self.workers):
                block = self.source.read(i, None)
                for start in range(0, len(block["index"]), self.batch_size):
                    yield {name: value[start : start + self.batch_size] for name, value in block.items()}
        except GenddError as err:
            yield {_ERROR: str(err)}


class _Loader:
    """A DataLoader whose worker processes start once, when it is made, and serve every later iteration.

    Workers are forked: one forked from a trainer that already holds its working memory shares those pages copy-on-
    write, and every page the trainer then rewrites is copied (measured: +550-800 MiB per worker when forked anew
    each epoch). Started before the model and its optimiser exist, they share little that is rewritten later.
    """

    def __init__(self, dataset: IterableDataset, workers: int, pin: bool, epoch=None, step=None) -> None:
        self.epoch, self.step = epoch, step
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=pin,
            prefetch_factor=4 if workers else None,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(0),  # its worker seeds (unused) must not draw on the global RNG
        )
        self._fresh = iter(self.loader) if workers else None  # starts the workers (and their first prefetch) now
        self._fresh_pass = self._pass()

    def _pass(self) -> tuple[int | None, int]:
        return (None if self.epoch is None else int(self.epoch.value), 0 if self.step is None else int(self.step.value))

    def iterate(self, epoch: int | None = None, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """One pass (of `epoch`, from its `start_step`); worker errors come back as one line."""
        if self._fresh is not None and (epoch, start_step) == self._fresh_pass:
            batches, self._fresh = self._fresh, None  # the pass the workers began when they started
        else:
            if self.epoch is not None:  # read by the workers when this pass resets them
                self.epoch.value, self.step.value = epoch, start_step
            self._fresh, batches = None, iter(self.loader)
        try:
            for batch in batches:
                if _ERROR in batch:
                    raise GenddError(batch[_ERROR])
                yield batch
        except RuntimeError as err:  # a worker killed (e.g. out of memory): say so in one line
            if "DataLoader worker" not in str(err):
                raise
            raise GenddError(f"a data loader worker died ({str(err).splitlines()[0]}); try fewer --workers") from err


def _open_source(shards: str | Path, cache: Caches, split: str) -> tuple[_Shards, InputInfo]:
    """Shards and cache(s) of a split, checked to be aligned chunk for shard, and what they describe."""
    from pipeline.cache.ensemble import open_caches

    index = load_index(shards)
    shard_set = index.split(split)
    spec = index.spec
    keys, labels = shard_set.keys_and_labels()
    info = InputInfo(
        n=shard_set.n,
        channels=int(spec["channels"]),
        image_size=int(spec["image_size"]),
        mean=tuple(spec["mean"]),
        std=tuple(spec["std"]),
        num_classes=int(spec["num_classes"]),
        labels=torch.as_tensor(labels, dtype=torch.int64),
    )
    store = None
    if cache is not None:
        store = open_caches(cache, split, spec_hash=index.spec_hash, shards=shard_set)
        aligned = store.n == shard_set.n and all(
            store.chunk_bounds(i) == (s, s + c)
            for i, (s, c) in enumerate(zip(shard_set.starts, shard_set.counts, strict=True))
        )
        if not aligned or store.n_chunks != len(shard_set.names) or not np.array_equal(store.keys, keys):
            raise GenddError(
                f"cache {store.path} does not match the shards of {shards} ({store.n} samples in {store.n_chunks} "
                f"chunks, shards: {shard_set.n} in {len(shard_set.names)}): re-run gendd extract with these shards"
            )
        info.num_views, info.feature_dim, info.num_classes = store.K, store.feature_dim, store.num_classes
        info.head_weight = torch.from_numpy(np.asarray(store.head_weight, np.float32))
        info.head_bias = torch.from_numpy(np.asarray(store.head_bias, np.float32))
        info.teachers, info.teacher_dims = store.teachers, store.teacher_dims
    return _Shards(shard_set, store, info.image_size), info


class StreamInput:
    """The stream mode of a split: per-epoch shard streams through DataLoader workers."""

    mode = "stream"

    def __init__(self, shards: str | Path, cache: Caches, split: str, options: DataOptions) -> None:
        self.source, self.info = _open_source(shards, cache, split)
        self.workers = stream_workers(options.workers)
        self.shuffle_buffer = options.shuffle_buffer
        self.pin = False  # set by `start` for a GPU
        self._loader: _Loader | None = None
        self._template: EpochPlan | None = None

    def place(self, device: torch.device) -> None:
        """Nothing to move: batches come from the loader (pinned for a GPU, see `start`)."""

    def start(self, plan: EpochPlan, device: torch.device | None = None, start_step: int = 0) -> None:
        """Start the loader workers for a run with this plan (any epoch, from `start_step`: their first pass), before
        training allocates its memory; batches are pinned in host memory for an asynchronous copy to a GPU."""
        template = replace(plan, epoch=0)
        if device is not None:
            self.pin = device.type == "cuda"
        if self._loader is None or template != self._template:
            context = multiprocessing.get_context("fork")
            epoch, step = context.Value("q", plan.epoch, lock=False), context.Value("q", start_step, lock=False)
            dataset = ShardStream(self.source, template, self.workers, self.shuffle_buffer, epoch, step)
            self._loader, self._template = _Loader(dataset, self.workers, self.pin, epoch, step), template

    def steps_per_epoch(self, seed: int, epoch: int, batch_size: int, world: int) -> int:
        """A worker yields ceil(its samples / batch) batches; a rank's steps are its workers' sum (max over ranks)."""
        counts = self.source.set.counts
        return max(
            sum(worker_batches(counts, EpochPlan(seed, epoch, batch_size, r, world), self.workers))
            for r in range(world)
        )

    def batches(self, plan: EpochPlan, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of one epoch from its `start_step`-th on (workers read ahead while the device trains)."""
        self.start(plan, start_step=start_step)  # a first pass begins where it is asked to
        return self._loader.iterate(plan.epoch, start_step)

    def feature_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Evenly spread cache chunks (all of them for small caches), read one at a time."""
        cache = self.source.cache
        if cache is None:
            return
        for i in stats_chunks(cache.n_chunks, cache.chunk_size):
            chunk = cache.read_chunk(i, dtype=np.float16)
            yield chunk["features"], chunk["labels"]


class EvalStream:
    """Every sample of a split once through the identity view, shard by shard, each time it is iterated (its
    workers start when it is made and serve every pass: per-epoch validation makes one before training)."""

    def __init__(self, shards: str | Path, cache: Caches, split: str, batch_size: int, workers: int, pin: bool) -> None:
        source, self.info = _open_source(shards, cache, split)
        workers = stream_workers(workers)
        self._loader = _Loader(_OrderedShards(source, batch_size, workers), workers, pin)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._loader.iterate()


def stream_eval_batches(
    shards: str | Path, cache: Caches, split: str, batch_size: int, workers: int, pin: bool = False
) -> tuple[InputInfo, EvalStream]:
    """(what the split holds, its batches with the teacher's view-0 logits when a cache is given)."""
    stream = EvalStream(shards, cache, split, batch_size, workers, pin)
    return stream.info, stream
