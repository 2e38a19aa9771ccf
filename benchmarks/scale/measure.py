"""Measure the ImageNet-shaped rehearsal: `dvc repro` of this folder's pipeline under a process-tree sampler.

    cd benchmarks/scale && python measure.py            # -> ../results/scale_imagenet_<machine>.{json,md}

Per stage (one `gendd` process and its children, e.g. loader workers): wall time, samples per second, and the peak
over time of the summed PSS (proportional set size: a page shared by a trainer and its forked workers counts once
in the sum) and summed RSS. Then, on the finished outputs: the per-process metadata a reader holds (keys, labels,
index; measured in a fresh process), the time to open the cache and to the first streamed batch, the disk used by
the workspace and by `.dvc/cache` (hard links counted once), and the time of `dvc status` and of a no-op
`dvc repro`. The pipeline's own outputs give the rest (accuracies, training throughput).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent  # the pipeline folder measured (--dir: another checkout's)
ROOT = HERE.parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # always this checkout's
OUTPUTS = ("data", "work", "students", "eval", "report")
MIB = 1 << 20


# ---- process tree sampling (Linux /proc) --------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _subtree(pid: int, tree: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) bytes of one process, 0 when it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        return []


def stage_label(argv: list[str]) -> str | None:
    """`gendd distill ... --out students/full-kd` -> "distill students/full-kd" (None: not a gendd stage)."""
    names = [Path(a).name for a in argv[:2]]
    if "gendd" not in names:
        return None
    rest = argv[names.index("gendd") + 1 :]
    if not rest or "--out" not in rest:
        return None
    return f"{rest[0]} {rest[rest.index('--out') + 1]}"


class TreeSampler(threading.Thread):
    """Samples the descendants of `root` every `period` seconds; one record per gendd stage process."""

    def __init__(self, root: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.period, self.stop = root, period, threading.Event()
        self.stages: dict[str, dict] = {}
        self.total_peak_pss = 0

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            tree = _children()
            total = 0
            for pid in _subtree(self.root, tree):
                label = stage_label(_cmdline(pid))
                if label is None:
                    continue
                pss = rss = 0
                members = _subtree(pid, tree)
                for member in members:
                    a, b = _memory(member)
                    pss, rss = pss + a, rss + b
                total += pss
                rec = self.stages.setdefault(label, {"start": now, "peak_pss": 0, "peak_rss": 0, "processes": 0})
                rec["end"] = now
                rec["peak_pss"], rec["peak_rss"] = max(rec["peak_pss"], pss), max(rec["peak_rss"], rss)
                rec["processes"] = max(rec["processes"], len(members))
            self.total_peak_pss = max(self.total_peak_pss, total)
            self.stop.wait(self.period)


def sampled(cmd: list[str], log: Path) -> tuple[int, TreeSampler]:
    """Run `cmd` in the pipeline folder (output to `log`) under a TreeSampler; (exit code, the sampler)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=handle, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.stop.set()
        sampler.join()
    return code, sampler


# ---- helpers -------------------------------------------------------------------------------------------------


def timed(cmd: list[str], log: Path | None = None) -> tuple[float, int, str]:
    """(seconds, exit code, output tail) of a command run in this folder."""
    started = time.time()
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    return time.time() - started, proc.returncode, (proc.stdout + proc.stderr)[-2000:]


def disk_bytes(*paths: Path) -> int:
    """Bytes on disk under `paths` together, every hard-linked file once (du's rule)."""
    existing = [str(p) for p in paths if p.exists()]
    if not existing:
        return 0
    out = subprocess.run(["du", "-s", "--block-size=1", "-c", *existing], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1].split()[0])


_PROBE = r"""
import gc, json, os, sys, time
import numpy as np
import torch
from pipeline.config import DataOptions
from pipeline.train.input import EpochPlan
from pipeline.train import stream

def pss():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024

shards, cache = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
stream._open_source(shards, cache, "val")  # imports and first-use state, so that the figure below is metadata only
gc.collect()
before = pss()
t0 = time.perf_counter()
source, info = stream._open_source(shards, cache, "train")
opened = time.perf_counter() - t0
after = pss()
t1 = time.perf_counter()
data = stream.StreamInput(shards, cache, "train", DataOptions(mode="stream", workers=1))
plan = EpochPlan(seed=0, epoch=0, batch_size=256)
batch = next(iter(data.batches(plan)))
first = time.perf_counter() - t1
print(json.dumps({"metadata_bytes": after - before, "open_cache_s": opened, "first_batch_s": first,
                  "batch": int(len(batch["images"]))}))
"""


def probe_reader(shards: Path, cache: Path) -> dict:
    """Metadata bytes of one reading process (PSS after opening shards and cache, minus before: keys, labels,
    index) and the time to open the cache and to get the first streamed batch, in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(shards), str(cache)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"reader probe failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _commit(where: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True)
    return out.stdout.strip()


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ---- the measurement ------------------------------------------------------------------------------------------


def per_stage(sampler: TreeSampler, params: dict, counts: dict) -> dict[str, dict]:
    """Seconds, peak PSS/RSS (MiB) and samples per second of every stage the sampler saw."""
    k = int(params["extract"]["views"])
    samples = {
        "prepare data/full/shards": counts["full"]["train"] + counts["full"]["val"],
        "prepare data/sixteenth/shards": counts["sixteenth"]["train"] + counts["sixteenth"]["val"],
        "teacher data/teacher": int(params["teacher"]["epochs"]) * counts["full"]["train"],
        "extract data/full/cache": k * counts["full"]["train"] + counts["full"]["val"],
        "extract data/sixteenth/cache": k * counts["sixteenth"]["train"] + counts["sixteenth"]["val"],
        "distill students/full-kd": int(params["distill"]["epochs"]) * counts["full"]["train"],
        "distill students/full-gendd": int(params["distill"]["epochs"]) * counts["full"]["train"],
        "distill students/sixteenth-kd": int(params["distill"]["epochs"]) * counts["sixteenth"]["train"],
        "evaluate eval/full-kd": counts["full"]["val"],
        "evaluate eval/full-gendd": counts["full"]["val"],
    }
    out = {}
    for label, rec in sampler.stages.items():
        seconds = rec["end"] - rec["start"]
        entry = {
            "seconds": round(seconds, 1),
            "peak_pss_mib": round(rec["peak_pss"] / MIB, 1),
            "peak_rss_mib": round(rec["peak_rss"] / MIB, 1),
            "processes": rec["processes"],
        }
        if label in samples:
            entry["samples"] = samples[label]
            entry["samples_per_s"] = round(samples[label] / max(seconds, 1e-9), 1)
        out[label] = entry
    return out


def split_counts(shards: Path) -> dict[str, int]:
    index = _json(shards / "index.json")
    return {name: int(entry["n"]) for name, entry in index.get("splits", {}).items()}


def markdown(result: dict) -> str:
    lines = [
        f"# ImageNet-shaped rehearsal ({result['machine']})",
        "",
        f"{result['date']}, {result['machine_detail']}. Command: `{result['command']}`.",
        "",
        f"Scale: {result['train_samples']:,} train / {result['val_samples']:,} val samples, {result['num_classes']} "
        f"classes, {result['train_shards']} train shards (ImageNet-1k's counts); scaled down: "
        f"{result['scaled_down']}.",
        "",
        "| stage | seconds | samples/s | peak PSS MiB (process tree) | peak RSS MiB | processes |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, s in result["per_stage"].items():
        rate = f"{s['samples_per_s']:,.0f}" if "samples_per_s" in s else ""
        lines.append(
            f"| {label} | {s['seconds']:,.0f} | {rate} | {s['peak_pss_mib']:,.0f} | {s['peak_rss_mib']:,.0f} "
            f"| {s['processes']} |"
        )
    keys = [
        "repro_s",
        "dvc_overhead_s",
        "noop_repro_s",
        "status_s",
        "metadata_mb_per_process",
        "open_cache_s",
        "first_batch_s",
        "stream_images_per_s",
        "stream_peak_ratio_16x",
        "workspace_gb",
        "dvc_cache_gb",
        "workspace_and_cache_gb",
        "disk_ratio",
        "after_repro_workspace_and_cache_gb",
        "relink_s",
        "teacher_val_top1",
    ]
    lines += ["", "| figure | value |", "| --- | ---: |"]
    lines += [f"| {k} | {result[k]} |" for k in keys if k in result]
    if "recheck" in result:
        check = result["recheck"]
        lines += [
            "",
            f"The stage table is `dvc repro` under code {result.get('repro_code')}; the headline memory figures above "
            f"(metadata, stream peak ratio, open and first-batch times, stream images/s) are `measure.py --recheck` "
            f"under code {check['code']}: each distill run alone on the same data, without DVC "
            f"(repro-time values: `repro_*` keys of the JSON).",
            "",
            "| recheck run | seconds | images/s | peak PSS MiB | peak RSS MiB | processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, r in check["runs"].items():
            lines.append(
                f"| {label} | {r['seconds']:,.0f} | {r['images_per_s']:,.0f} | {r['peak_pss_mib']:,.0f} "
                f"| {r['peak_rss_mib']:,.0f} | {r['processes']} |"
            )
    lines += ["", "| student | probe top-1 | generative top-1 | refit top-1 |", "| --- | ---: | ---: | ---: |"]
    for run, m in result["students"].items():
        lines.append(f"| {run} | {m.get('probe_top1')} | {m.get('generative_top1')} | {m.get('refit_top1')} |")
    return "\n".join(lines) + "\n"


def recheck(params: dict) -> dict:
    """The stream memory and metadata figures under this checkout's code, on the finished data: `gendd distill`
    kd on the full and the 1/16 data, each run alone under the sampler (no DVC), and the reader probe."""
    runs = {}
    for part in ("full", "sixteenth"):
        out = HERE / "work" / "recheck" / f"{part}-kd"
        options = [f"--{k}={v}" for k, v in params["distill"].items() if not isinstance(v, bool)]
        options += [f"--{k}" if v else f"--no-{k}" for k, v in params["distill"].items() if isinstance(v, bool)]
        cmd = [
            "gendd",
            "distill",
            "--shards",
            f"data/{part}/shards",
            "--cache",
            f"data/{part}/cache",
            "--out",
            str(out),
        ]
        cmd += ["--method", "kd", "--no-resume", *options]
        started = time.time()
        code, sampler = sampled(cmd, HERE / "work" / f"recheck-{part}.log")
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({code}): see work/recheck-{part}.log")
        (rec,) = sampler.stages.values()
        history = _json(out / "train.json").get("history", [{}])
        runs[f"distill {part}-kd"] = {
            "seconds": round(time.time() - started, 1),
            "peak_pss_mib": round(rec["peak_pss"] / MIB, 1),
            "peak_rss_mib": round(rec["peak_rss"] / MIB, 1),
            "processes": rec["processes"],
            "images_per_s": history[-1].get("images_per_s"),
        }
    probe = probe_reader(HERE / "data/full/shards", HERE / "data/full/cache")
    return {
        "code": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "runs": runs,
        "stream_peak_ratio_16x": round(
            runs["distill full-kd"]["peak_pss_mib"] / runs["distill sixteenth-kd"]["peak_pss_mib"], 3
        ),
        "metadata_mb_per_process": round(probe["metadata_bytes"] / 1e6, 1),
        "open_cache_s": round(probe["open_cache_s"], 2),
        "first_batch_s": round(probe["first_batch_s"], 2),
        "stream_images_per_s": runs["distill full-kd"]["images_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="cpu", help="names the result files: scale_imagenet_<machine>")
    parser.add_argument("--skip-repro", action="store_true", help="measure finished outputs only (no stage table)")
    parser.add_argument("--dir", type=Path, default=None, help="the pipeline folder to measure (default: this one)")
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="add the stream memory and metadata figures of this checkout's code (finished data, no DVC) to the "
        "existing result, as `recheck`, and make them the headline figures",
    )
    args = parser.parse_args()
    if args.dir is not None:  # every helper reads the module's HERE
        globals()["HERE"] = args.dir.resolve()
    if args.recheck:
        name = f"scale_imagenet_{args.machine}"
        result = _json(RESULTS / f"{name}.json")
        if not result:
            raise SystemExit(f"no {RESULTS / name}.json to add to: run measure.py first")
        result.setdefault("repro_code", _commit(HERE))  # the checkout whose `dvc repro` made the stage table
        result["recheck"] = recheck(yaml.safe_load((HERE / "params.yaml").read_text()))
        for key in ("stream_peak_ratio_16x", "metadata_mb_per_process", "open_cache_s", "first_batch_s"):
            result[f"repro_{key}"], result[key] = result.get(key), result["recheck"][key]
        result["stream_images_per_s"] = result["recheck"]["stream_images_per_s"]
        result["command"] += (
            f" && python measure.py --recheck{' --machine ' + args.machine if args.machine != 'cpu' else ''}"
        )
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{name}.md").write_text(markdown(result))
        print(markdown(result))
        return
    params = yaml.safe_load((HERE / "params.yaml").read_text())
    command = "cd benchmarks/scale && python measure.py"
    command += f" --machine {args.machine}" if args.machine != "cpu" else ""
    result: dict = {"machine": args.machine, "command": command}
    started = time.time()
    if not args.skip_repro:
        log = HERE / "work" / "repro.log"
        code, sampler = sampled(["dvc", "repro"], log)
        if code != 0:
            raise SystemExit(f"dvc repro failed ({code}): see {log}")
        result["repro_s"] = round(time.time() - started, 1)
    counts = {part: split_counts(HERE / "data" / part / "shards") for part in ("full", "sixteenth")}
    if not args.skip_repro:
        result["per_stage"] = per_stage(sampler, params, counts)
        stage_sum = sum(s["seconds"] for s in result["per_stage"].values())
        result["dvc_overhead_s"] = round(result["repro_s"] - stage_sum, 1)
        full = result["per_stage"].get("distill students/full-kd", {})
        part = result["per_stage"].get("distill students/sixteenth-kd", {})
        if full and part:
            result["stream_peak_ratio_16x"] = round(full["peak_pss_mib"] / part["peak_pss_mib"], 3)
    index = _json(HERE / "data/full/shards/index.json")
    result["train_samples"], result["val_samples"] = counts["full"]["train"], counts["full"]["val"]
    result["num_classes"] = int(index["spec"]["num_classes"])
    result["train_shards"] = len(index["splits"]["train"]["shards"])
    spec = index["spec"]
    result["scaled_down"] = (
        f"pixels ({spec['image_size']}x{spec['image_size']}x{spec['channels']} instead of ~224x224x3), models "
        f"(teacher {params['teacher']['model']}, student {params['distill']['student']}), "
        f"epochs (teacher {params['teacher']['epochs']}, students {params['distill']['epochs']})"
    )
    workspace = [HERE / name for name in OUTPUTS]
    cache = ROOT / ".dvc" / "cache"
    # `dvc repro` copies each output into the cache and leaves the workspace copy (DVC issue #10549); one
    # `dvc checkout --relink` afterwards replaces the workspace files with links to the cached ones.
    result["after_repro_workspace_and_cache_gb"] = round(disk_bytes(*workspace, cache) / 1e9, 2)
    seconds, code, tail = timed(["dvc", "checkout", "--relink", "dvc.yaml"])
    if code != 0:
        raise SystemExit(f"dvc checkout --relink failed ({code}): {tail[-500:]}")
    result["relink_s"] = round(seconds, 1)
    result["status_s"] = round(timed(["dvc", "status", "dvc.yaml"])[0], 1)
    seconds, code, tail = timed(["dvc", "repro", "dvc.yaml"])
    if code != 0 or "up to date" not in tail:
        raise SystemExit(f"the no-op dvc repro did work or failed ({code}): {tail[-500:]}")
    result["noop_repro_s"] = round(seconds, 1)
    probe = probe_reader(HERE / "data/full/shards", HERE / "data/full/cache")
    result["metadata_mb_per_process"] = round(probe["metadata_bytes"] / 1e6, 1)
    result["open_cache_s"], result["first_batch_s"] = round(probe["open_cache_s"], 2), round(probe["first_batch_s"], 2)
    ws, dc, both = disk_bytes(*workspace), disk_bytes(cache), disk_bytes(*workspace, cache)
    result |= {"workspace_gb": round(ws / 1e9, 2), "dvc_cache_gb": round(dc / 1e9, 2)}
    result |= {"workspace_and_cache_gb": round(both / 1e9, 2), "disk_ratio": round(both / ws, 3)}
    result["dvc_cache_type"] = subprocess.run(
        ["dvc", "config", "cache.type"], cwd=HERE, capture_output=True, text=True
    ).stdout.strip()
    history = _json(HERE / "students/full-kd/train.json").get("history", [{}])
    result["stream_images_per_s"] = history[-1].get("images_per_s")
    teacher = _json(HERE / "data/teacher/teacher.json")
    result["teacher_val_top1"] = teacher.get("extra", {}).get("val_top1")
    result["students"] = {}
    for run in ("full-kd", "full-gendd"):
        m = _json(HERE / "eval" / run / "details.json")
        fields = ("probe_top1", "generative_top1", "refit_top1", "teacher_top1", "eval_seconds", "refit_seconds")
        result["students"][run] = {k: m.get(k) for k in fields}
    result["date"] = datetime.date.today().isoformat()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    result["machine_detail"] = (
        f"{os.cpu_count()} CPU cores, {mem:.0f} GiB, {platform.processor() or platform.machine()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    result["params"] = params
    name = f"scale_imagenet_{args.machine}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {RESULTS / name}.json and .md ({shlex.quote(command)})")


if __name__ == "__main__":
    main()
