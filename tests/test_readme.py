"""The README's "Your own images" walk-through, run as written on a tiny folder of class sub-folders."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT


def _walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Your own images", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_your_own_images_walkthrough_runs_from_an_empty_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):  # two classes a small network can tell apart: bright vs dark
        (tmp_path / "my_images" / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 100, (20, 24, 3)) + 150 * c
            suffix = "png" if i % 2 else "jpg"
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "my_images" / name / f"{i}.{suffix}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the `gendd` of this environment
    script = "set -euo pipefail\n" + _walkthrough()
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    index = json.loads((tmp_path / "data" / "my_shards" / "index.json").read_text())
    assert index["class_names"] == ["cat", "dog"]
    assert (index["splits"]["train"]["n"], index["splits"]["val"]["n"]) == (16, 4)
    metrics = json.loads((tmp_path / "outputs" / "my_eval" / "metrics.json").read_text())
    assert {"probe_top1", "generative_top1", "teacher_top1"} <= metrics.keys()
    again = subprocess.run(
        ["gendd", "prepare", "--spec", "my_images.yaml", "--out", "data/my_shards"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "up to date" in again.stdout
