"""What the cache buys: steps/s of GenDD distillation with cached targets, online teacher targets, plain CE, and
targets already on the device.

Per case, in one process, the same batches (the memory mode's batches of epoch 0,
`pipeline.train.memory.MemoryInput`, as the training loop draws them) and one optimiser step = forward, loss via
`compute_objective`, backward, AdamW:
- cached: images on the device, views applied, cached teacher outputs gathered by the memory mode from its in-memory
  arrays and moved to the device (`MemoryInput.batches` + `pipeline.train.student.batch_targets`, exactly what
  `train` calls);
- online: the teacher (`TeacherRunner`) runs on the same views every step, then the same student + head step;
- ce: the plain student with cross-entropy (no teacher, no head);
- in-memory: student inputs (views applied) and targets precomputed on the device; only the model step is timed;
- teacher: the teacher forward alone on the step's views (for the ideal speedup);
- head: the generative head's loss forward + backward alone (its share of the GenDD step).
Rounds alternate the variants; per-step time = best round (median in the JSON).

  python benchmarks/bench_cache_speedup.py                 # digits (resnet18 teacher) + large (resnet50, 224 px)
  python benchmarks/bench_cache_speedup.py --device cuda --batch 256 --large-n 512 --large-batch 64 --steps 20
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from benchlib import (
    digits_shards,
    machine,
    make_parser,
    random_teacher,
    result_name,
    setup,
    sync,
    synthetic_shards,
    timed,
    write_results,
)

from pipeline.cache.store import open_cache
from pipeline.config import ExtractConfig, HeadSettings, ObjectiveConfig, TrainConfig
from pipeline.data.shards import ShardIndex
from pipeline.data.views import apply_views
from pipeline.distill.student import target_stats
from pipeline.extract.extract import TeacherRunner, extract
from pipeline.train.input import EpochPlan
from pipeline.train.memory import MemoryInput, memory_input
from pipeline.train.student import Student, batch_targets, build_student, param_groups

NAME = "cache_speedup"


@dataclass(frozen=True)
class Case:
    """One teacher/student/data setting."""

    name: str
    index: ShardIndex
    teacher: str
    input_size: int
    small_stem: bool
    student: str
    batch: int
    views: int
    token_dim: int


def ensure_cache(args, case: Case, device: torch.device) -> tuple[Path, Path]:
    """Teacher dir and a complete feature cache of the case's train split (built once, then reused)."""
    tag = f"{case.index.spec['name']}-{case.teacher}-{case.input_size}"
    tdir = random_teacher(args.work / "teachers" / tag, case.teacher, case.index, case.input_size, case.small_stem)
    cache = args.work / "caches" / f"{tag}-K{case.views}"
    try:
        open_cache(cache, "train", spec_hash=case.index.spec_hash)
    except Exception:  # missing or incomplete: (re)build it; extraction resumes whatever is done
        cfg = ExtractConfig(
            case.index.root,
            tdir,
            cache,
            ("train",),
            case.views,
            batch_size=max(case.batch, 64),
            cpu=device.type == "cpu",
        )
        extract(cfg)
    return tdir, cache


def train_config(args, case: Case, method: str) -> TrainConfig:
    """The distill stage's settings (params.yaml) for this case."""
    return TrainConfig(
        model=case.student,
        small_stem=case.small_stem,
        objective=ObjectiveConfig(method=method),
        batch_size=case.batch,
        head=HeadSettings(
            token_dim=case.token_dim,
            width=args.head_width,
            depth=args.head_depth,
            diffusion_batch_mul=args.diffusion_batch_mul,
        ),
        seed=args.seed,
        cpu=torch.device(args.device).type == "cpu",
    )


def model_step(model: Student, optimizer: torch.optim.Optimizer, x, batch: dict, cfg: TrainConfig, amp) -> None:
    """One optimiser step as `train` takes it (no accelerate wrapper: single process, same ops)."""
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss, _ = model(x, batch, cfg.objective, False)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run_rounds(variants: dict[str, Callable[[int], None]], steps: int, rounds: int, device) -> dict[str, list[float]]:
    """Seconds per step of every variant, one list entry per round; rounds alternate the variants."""
    for fn in variants.values():  # warm-up: allocator, kernels, optimiser state
        fn(0)
        fn(1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            seconds, _ = timed(lambda fn=fn: [fn(s) for s in range(steps)], device)
            times[name].append(seconds / steps)
    return times


def measure(args, case: Case, device: torch.device) -> tuple[dict, dict]:
    """Per-step times of every variant for one case; returns (summary row, all round times)."""
    tdir, cache = ensure_cache(args, case, device)
    source: MemoryInput = memory_input(case.index.root, cache)
    info = source.info
    runner = TeacherRunner(tdir, device, None)
    size, amp = case.input_size, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    gendd_cfg, ce_cfg = train_config(args, case, "gendd"), train_config(args, case, "ce")
    torch.manual_seed(args.seed)
    gendd = build_student(gendd_cfg, info, size, target_stats(gendd_cfg, source)).to(device).train()
    ce = build_student(ce_cfg, replace(info, feature_dim=None), size).to(device).train()
    opt_g = torch.optim.AdamW(param_groups(gendd, 0.05, gendd_cfg.head.lr_mult), lr=1e-3)
    opt_c = torch.optim.AdamW(param_groups(ce, 0.05, 1.0), lr=1e-3)
    source.place(device)  # where training keeps images and targets (on a GPU: on the device when they fit)
    plan = EpochPlan(args.seed, 0, case.batch)
    n_batches = max(1, info.n // case.batch)

    def drawn() -> object:  # the memory mode's batches, drawn again and again as epochs would
        while True:
            yield from itertools.islice(source.batches(plan), n_batches)

    stream = drawn()
    batches = [next(stream) for _ in range(min(args.steps, n_batches))]

    def inputs(s: int) -> torch.Tensor:
        b = batches[s % len(batches)]
        return apply_views(b["images"].to(device), b["views"].to(device), size, info.mean, info.std)

    def cached(s: int) -> None:
        b = next(stream)
        x = apply_views(b["images"].to(device), b["views"].to(device), size, info.mean, info.std)
        model_step(gendd, opt_g, x, batch_targets(b, info, device, True), gendd_cfg, amp)

    def teacher_batch(s: int) -> dict:
        b = batches[s % len(batches)]
        feats, logits = runner(b["images"].to(device), b["views"].to(device))
        labels = b["labels"].to(device)
        head = {"head_weight": runner.weight, "head_bias": runner.bias}
        return {"labels": labels, "teacher_features": feats, "teacher_logits": logits, **head}

    def online(s: int) -> None:
        model_step(gendd, opt_g, inputs(s), teacher_batch(s), gendd_cfg, amp)

    def plain_ce(s: int) -> None:
        b = batches[s % len(batches)]
        model_step(ce, opt_c, inputs(s), {"labels": b["labels"].to(device)}, ce_cfg, amp)

    # In memory: everything a step reads already sits on the device (inputs with views applied, targets).
    ready = [(inputs(s), batch_targets(batches[s], info, device, True)) for s in range(len(batches))]
    sync(device)

    def in_memory(s: int) -> None:
        x, batch = ready[s % len(ready)]
        model_step(gendd, opt_g, x, batch, gendd_cfg, amp)

    def views_only(s: int) -> None:
        inputs(s)

    def gather_only(s: int) -> None:
        batch_targets(next(stream), info, device, True)

    # The generative head alone (forward + backward on fixed conditions and targets): its share of the step.
    z = torch.randn(case.batch, gendd.head.config.cond_dim, device=device, requires_grad=True)
    y = ready[0][1]["teacher_features"]

    def head_only(s: int) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = gendd.head(y, gendd.head.condition(z))
        loss.backward()

    def teacher_only(s: int) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            teacher_batch(s)

    variants = {
        "cached": cached,
        "online": online,
        "ce": plain_ce,
        "in_memory": in_memory,
        "teacher": teacher_only,
        "head": head_only,
        "views": views_only,
        "gather": gather_only,
    }
    times = run_rounds(variants, args.steps, args.rounds, device)
    best = {name: min(t) for name, t in times.items()}
    ideal = (best["in_memory"] + best["teacher"]) / best["in_memory"]
    speedup = best["online"] / best["cached"]
    row = {
        "case": case.name,
        "teacher": f"{case.teacher} (D_T {info.feature_dim})",
        "student": case.student,
        "input": f"{info.channels}x{size}px",
        "batch": case.batch,
        **{f"{name}_steps_per_s": 1.0 / best[name] for name in ("cached", "online", "ce", "in_memory")},
        "teacher_ms": 1e3 * best["teacher"],
        "in_memory_ms": 1e3 * best["in_memory"],
        "head_fwd_bwd_ms": 1e3 * best["head"],
        "head_rows": case.batch * gendd.head.config.num_tokens * args.diffusion_batch_mul,
        "ce_ms": 1e3 * best["ce"],
        "cached_ms": 1e3 * best["cached"],
        "views_ms": 1e3 * best["views"],
        "gather_ms": 1e3 * best["gather"],
        "loading_overhead": best["cached"] / best["in_memory"] - 1.0,
        "data_work_share": (best["views"] + best["gather"]) / best["in_memory"],
        "speedup": speedup,
        "ideal_speedup": ideal,
        "speedup_over_ideal": speedup / ideal,
        "cached_over_ce": best["cached"] / best["ce"],
    }
    return row, {name: {"best_s": min(t), "median_s": statistics.median(t), "rounds_s": t} for name, t in times.items()}


def cases(args) -> list[Case]:
    """The cases asked for: `digits` (small teacher, 8 px) and `large` (big teacher, 224-px synthetic images)."""
    out = []
    if "digits" in args.cases:
        index = digits_shards(args.work, 256)
        out.append(Case("digits", index, args.teacher, 8, True, args.student, args.batch, args.views, args.token_dim))
    if "large" in args.cases:
        index = synthetic_shards(args.work, args.large_n, args.large_size, 3, 256)
        out.append(
            Case(
                "large",
                index,
                args.large_teacher,
                args.large_size,
                False,
                args.student,
                args.large_batch,
                args.large_views,
                args.large_token_dim,
            )
        )
    return out


def main() -> None:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["digits", "large"], choices=("digits", "large"))
    parser.add_argument("--teacher", default="resnet18", help="digits case: teacher (small stem, 8 px)")
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--batch", type=int, default=64, help="digits case batch (params.yaml distill: 64)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--token-dim", type=int, default=32)
    parser.add_argument("--large-teacher", default="resnet50", help="large case teacher (resnet50, vit_base_...)")
    parser.add_argument("--large-n", type=int, default=16, help="large case: synthetic 224-px train images")
    parser.add_argument("--large-size", type=int, default=224)
    parser.add_argument("--large-batch", type=int, default=8)
    parser.add_argument("--large-views", type=int, default=2)
    parser.add_argument("--large-token-dim", type=int, default=64)
    parser.add_argument("--head-width", type=int, default=256)
    parser.add_argument("--head-depth", type=int, default=3)
    parser.add_argument("--diffusion-batch-mul", type=int, default=4)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = setup(args)
    rows, raw = [], {}
    for case in cases(args):
        row, times = measure(args, case, device)
        rows.append(row)
        raw[case.name] = times
        print(
            f"{case.name}: cached {row['cached_steps_per_s']:.2f} steps/s, online {row['online_steps_per_s']:.2f}, "
            f"ce {row['ce_steps_per_s']:.2f}, in-memory {row['in_memory_steps_per_s']:.2f}; overhead "
            f"{row['loading_overhead']:+.1%}, speedup {row['speedup']:.2f} / ideal {row['ideal_speedup']:.2f} = "
            f"{row['speedup_over_ideal']:.3f}"
        )
    summary = {}
    for r in rows:
        summary[f"{r['case']}: loading overhead (target <= 10%)"] = f"{r['loading_overhead']:+.1%}"
        summary[f"{r['case']}: data work alone / in-memory step"] = f"{r['data_work_share']:.1%}"
        summary[f"{r['case']}: speedup / ideal (target >= 0.9)"] = r["speedup_over_ideal"]
        summary[f"{r['case']}: speedup (online / cached)"] = r["speedup"]
        summary[f"{r['case']}: cached / plain CE step time"] = r["cached_over_ce"]
    notes = [
        f"head: token_dim {args.token_dim} (digits) / {args.large_token_dim} (large), width {args.head_width}, depth "
        f"{args.head_depth}, diffusion_batch_mul {args.diffusion_batch_mul}; AdamW; mixed precision "
        f"{args.mixed_precision}; {args.steps} steps x {args.rounds} rounds per variant, best round.",
        "loading overhead = cached step / in-memory step - 1 (views applied + cache gather + host->device copy); "
        "speedup = online / cached step time; ideal = (in-memory step + teacher forward) / in-memory step.",
        "views_ms and gather_ms: the cached step's data work alone (apply_views; pipeline.train.loop._batch), and "
        "data_work_share = their sum over the in-memory step: the overhead without the round-to-round noise; "
        "head_fwd_bwd_ms: the generative head's loss forward + backward alone on head_rows = batch x tokens x "
        "diffusion_batch_mul denoiser rows.",
        "random-weight teachers (pretrained=False); step times do not depend on the weights.",
    ]
    tables = {"steps per second and ratios": rows}
    write_results(args.out, result_name(NAME, args), machine(device), tables, summary, notes, {"round_times": raw})


if __name__ == "__main__":
    main()
