"""Sampling: generative-path top-1 and images/s per sampler, steps and samples averaged, next to the probe path.

Needs a trained GenDD student. By default one is made here on digits (reused on later runs from --work):
teacher `test_efficientnet` trained with CE (`make_teacher`), cache with K views (`extract`), student `test_resnet`
distilled with gendd (`distill`; token_dim 32, head width 256, diffusion_batch_mul 2). Or pass --student-dir,
--cache and --shards of existing outputs. Every sampler setting runs `pipeline.evaluate.predict` on the whole val
split (digits: 360 images, so one image is 0.28 points) with the same seeds (`--seeds`, from 0).

  python benchmarks/bench_sampling.py                      # trains on digits first (a few minutes on 1 CPU thread)
  python benchmarks/bench_sampling.py --student-dir outputs/students/test_resnet-gendd --cache outputs/cache \
      --shards outputs/shards
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from benchlib import digits_shards, machine, make_parser, result_name, setup, timed, trained_teacher, write_results

from pipeline.cache.store import open_cache
from pipeline.config import ExtractConfig, HeadSettings, ObjectiveConfig, SamplingConfig, TrainConfig
from pipeline.data.shards import load_index, load_split
from pipeline.distill.distill import DistillConfig, distill
from pipeline.distill.student import load_student
from pipeline.evaluate.predict import predict
from pipeline.extract.extract import extract
from pipeline.train.probe import topk_accuracy

NAME = "sampling"
GRID = (("ddpm", 100), ("ddim", 25), ("ddim", 10), ("dpmsolver", 10), ("dpmsolver", 5))


def make_student(args, device: torch.device) -> tuple[Path, Path, Path]:
    """(student dir, cache, shards): digits -> teacher -> cache -> GenDD student, each step skipped when done."""
    root = args.work / "sampling"
    index = digits_shards(args.work, 256)
    tdir = trained_teacher(
        root / f"teacher-{args.teacher}-{args.teacher_epochs}", index, args.teacher, args.teacher_epochs, device
    )
    cache = root / f"cache-{args.teacher}-{args.teacher_epochs}-K{args.views}"
    cpu = device.type == "cpu"
    extract(
        ExtractConfig(
            shards=index.root,
            teacher=tdir,
            out=cache,
            splits=("train", "val"),
            num_views=args.views,
            batch_size=512,
            cpu=cpu,
        )
    )
    student_dir = root / f"student-{args.student}-gendd-{args.epochs}"
    if not (student_dir / "student.json").is_file():
        cfg = TrainConfig(
            model=args.student,
            objective=ObjectiveConfig(method="gendd"),
            epochs=args.epochs,
            batch_size=64,
            lr=2e-3,
            head=HeadSettings(token_dim=32, width=256, depth=3, diffusion_batch_mul=2),
            warmstart_epochs=args.warmstart_epochs,
            seed=args.seed,
            cpu=cpu,
        )
        summary = distill(DistillConfig(shards=index.root, cache=cache, out=student_dir, train=cfg))
        print(f"student trained in {summary['train_seconds']:.0f}s: {summary['final']}")
    return student_dir, cache, index.root


def sampler_grid(run, labels: torch.Tensor, samples: list[int], seeds: int, cfg_scale: float) -> list[dict]:
    """Top-1 (mean and spread over seeds) and images/s of every sampler setting, and paired flips vs ddpm 100."""
    rows, correct = [], {}
    for n_samples in samples:
        for sampler, steps in GRID:
            top1, seconds = [], []
            for seed in range(seeds):
                cfg = SamplingConfig(sampler, steps, cfg_scale, n_samples, seed)
                elapsed, logits = run(cfg)
                seconds.append(elapsed)
                top1.append(topk_accuracy(logits["generative"], labels, 1))
                if seed == 0:
                    correct[(sampler, steps, n_samples)] = logits["generative"].argmax(1) == labels
            row = {"path": "generative", "sampler": sampler, "steps": steps, "samples": n_samples}
            row |= {"top1": statistics.mean(top1), "top1_seed_std": statistics.pstdev(top1)}
            row["images_per_s"] = len(labels) / min(seconds)
            rows.append(row)
            print(
                f"{sampler} {steps} steps x{n_samples}: top-1 {row['top1']:.2f}% over {seeds} seed(s), "
                f"{row['images_per_s']:.1f} images/s"
            )
    for row in rows:
        key = (row["sampler"], row["steps"], row["samples"])
        ref_row = next(r for r in rows if r["sampler"] == "ddpm" and r["samples"] == row["samples"])
        ref = correct[("ddpm", ref_row["steps"], row["samples"])]
        row["minus_ddpm100"] = row["top1"] - ref_row["top1"]
        row["seed0_images_gained_lost"] = f"+{int((correct[key] & ~ref).sum())}/-{int((ref & ~correct[key]).sum())}"
        row["speedup_vs_ddpm100"] = row["images_per_s"] / ref_row["images_per_s"]
    return rows


def main() -> None:
    parser = make_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--student-dir", type=Path, help="an existing distilled GenDD student (skip training)")
    parser.add_argument("--cache", type=Path, help="its feature cache (needs the val split)")
    parser.add_argument("--shards", type=Path, help="its image shards")
    parser.add_argument("--teacher", default="test_efficientnet")
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--student", default="test_resnet")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmstart-epochs", type=int, default=0)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 5], help="samples averaged per image")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=360, help="images per predict batch")
    parser.add_argument("--seeds", type=int, default=1, help="sampling seeds per setting (top-1 mean over them)")
    args = parser.parse_args()
    device = setup(args)
    if args.student_dir:
        student_dir, cache, shards = args.student_dir, args.cache, args.shards
        if cache is None or shards is None:
            raise SystemExit("--student-dir needs --cache and --shards")
    else:
        student_dir, cache, shards = make_student(args, device)
    index = load_index(shards)
    val = load_split(index.split("val"))
    student, card = load_student(student_dir)
    store = open_cache(cache, "val", spec_hash=index.spec_hash)
    head = (torch.from_numpy(store.head_weight).float(), torch.from_numpy(store.head_bias).float())
    teacher_top1 = topk_accuracy(torch.from_numpy(store.load_all()["logits"][:, 0]), val.labels, 1)
    size, mean, std = card["input_size"], tuple(card["mean"]), tuple(card["std"])
    n = len(val.labels)

    def run(sampling: SamplingConfig | None) -> tuple[float, dict]:
        return timed(
            lambda: predict(
                student,
                val.images,
                size,
                mean,
                std,
                device=device,
                batch_size=args.batch,
                sampling=sampling,
                teacher_head=head,
            ),
            device,
        )

    run(None)  # warm-up
    probe_s, probe = min((run(None) for _ in range(3)), key=lambda r: r[0])
    probe_top1 = topk_accuracy(probe["probe"], val.labels, 1)
    probe_row = {"path": "probe", "sampler": "-", "steps": 0, "samples": 0, "top1": probe_top1}
    rows = [probe_row | {"images_per_s": n / probe_s}]
    rows += sampler_grid(run, val.labels, args.samples, args.seeds, args.cfg_scale)
    summary = {
        "val images": n,
        "one image (points)": 100 / n,
        "teacher top-1 (cache, view 0)": teacher_top1,
        "probe top-1": probe_top1,
    }
    for n_samples in args.samples:
        fast = [r for r in rows[1:] if r["samples"] == n_samples and r["steps"] <= 10]
        best = max(fast, key=lambda r: r["minus_ddpm100"])
        ref = next(r for r in rows[1:] if r["samples"] == n_samples and r["sampler"] == "ddpm")
        verdict = "met" if best["minus_ddpm100"] >= -0.2 else "missed"
        summary[f"{n_samples} sample(s): ddpm 100 top-1"] = ref["top1"]
        summary[f"{n_samples} sample(s): best <=10-step sampler"] = (
            f"{best['sampler']} {best['steps']}: {best['top1']:.2f}% ({best['minus_ddpm100']:+.2f} points, "
            f"{best['seed0_images_gained_lost']} images; target not more than 0.2 below: {verdict})"
        )
    notes = [
        f"student {student_dir} ({card['name']}), guidance scale {args.cfg_scale}, {args.seeds} sampling seed(s) "
        f"from 0; val split of {index.spec['name']}: {n} images, one image = {100 / n:.2f} points.",
        "images/s: the whole predict call (student forward, sampling, teacher head) on the val split; the probe "
        "path is the student's own classifier (best of 3).",
        "minus_ddpm100: top-1 minus the ddpm 100-step top-1 with the same samples averaged; "
        "seed0_images_gained_lost: val images this setting gets right and ddpm 100 wrong / the reverse (seed 0), "
        "a paired view of how much of a difference is sampling noise.",
    ]
    write_results(args.out, result_name(NAME, args), machine(device), {"sampler grid": rows}, summary, notes)


if __name__ == "__main__":
    main()
