"""Shared fixtures: tiny data made here (the embedded digits set and synthetic arrays), never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.shards import ShardIndex, prepare_shards
from pipeline.specs import load_spec

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SPEC = ROOT / "data_specs" / "digits.yaml"


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> ShardIndex:
    """The digits set (first 200 samples of each split) in shards of 64."""
    out = tmp_path_factory.mktemp("digits_shards")
    index, _ = prepare_shards(load_spec(DIGITS_SPEC), out, shard_size=64, max_samples=200)
    return index
