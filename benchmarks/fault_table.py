"""Write docs/faults.md: every fault tests/test_faults.py injects through the CLI, and the one line gendd prints.

python benchmarks/fault_table.py            # runs the fault tests (about 30 s on 2 CPU cores)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Faults and the line gendd prints

Every row is a fault that `tests/test_faults.py` injects through the real `gendd` entry point; the test asserts a
non-zero exit, exactly one line on stderr, no traceback, and no output that looks finished. The lines below are what
that run printed ({day}, `python benchmarks/fault_table.py`); `<tmp>` is the test's directory, `<in>` the shared
inputs (digits shards, two synthetic caches, a student distilled from the first).

## What is checked

Option ranges and choices, before any work; the output location is writable, before long work; shards against the
size and sha256 `index.json` records (`prepare` rewrites a damaged shard byte for byte: the cache stays valid);
NaN/inf and damaged chunks wherever cached values are read (naming store, array and chunk); a non-finite training loss
(naming epoch and step; the checkpoint keeps the last good epoch, nothing is exported); a student's teacher, cache
and dataset (recorded in `student.json`: evaluating with another teacher's cache is refused); a cache whose image
shards changed since extraction (the cache records each shard's sha256; the line names the shard); an operating-system
error (a full disk, a read-only folder) names the file it concerns. `gendd cache verify` reads every chunk of every
array (checksums, shapes, finiteness, done flags, attributes), then replays `--samples` (default 32) views through
the teacher with a pass/fail tolerance; it lists every problem and exits 2 on any (`--quick`: the replay only;
`--samples 0`: the scan only). A damaged Zarr chunk is fixed by deleting its done flag (`<split>.zarr/done/c/<i>`)
and re-running `gendd extract`.

## The faults

| fault | stage | message |
| --- | --- | --- |
"""


def _tidy(text: str) -> str:
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/faults\d+", "<in>", text)
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/digits_shards\d+", "<in>/shards", text)
    text = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/test_fault[^/ ]*", "<tmp>", text)
    return text.replace("|", "\\|")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "GENDD_FAULT_TABLE": str(table), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_faults.py"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        rows = [json.loads(line) for line in table.read_text().splitlines()]
    lines = [HEADER.format(day=date.today().isoformat())]
    for row in rows:
        message = _tidy(row["line"].removeprefix("gendd: error: "))
        lines.append(f"| {row['case']} | `gendd {row['argv'][0]}` | {message} |\n")
    (ROOT / "docs" / "faults.md").write_text("".join(lines))
    print(f"{len(rows)} faults -> docs/faults.md")


if __name__ == "__main__":
    main()
