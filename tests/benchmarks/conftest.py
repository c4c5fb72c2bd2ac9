"""Fixtures for the benchmark tests: a small generated COCO-format dataset."""

from __future__ import annotations

import pytest

from benchmarks.coco_eval import open_coco
from benchmarks.synthetic_coco import write_synthetic_coco


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """Root of a 4-image synthetic COCO folder (val2017/ + annotations/instances_val2017.json)."""
    return write_synthetic_coco(tmp_path_factory.mktemp("synthetic_coco"), num_images=4, seed=3)


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_coco):
    return open_coco(synthetic_coco)
