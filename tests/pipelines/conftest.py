"""Fixtures of the sweep tests: the pipeline's stage outputs (backbones, banks, prepared tasks)
and a tiny sweep config writer. The tests reuse the outputs of ``stages.prepare``,
``stages.pretrain`` and ``stages.mimic``; they are skipped where those are missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
STAGE_OUTPUTS = (REPO / "outputs/pretrain/vit.json", REPO / "outputs/mimic/vit/recast.json",
                 REPO / "data/prepared/offline/mnist_lo5/manifest.json")
TINY_TRAIN = {"epochs": 1, "lr": 0.01, "step_size": 10, "batch_size": 32, "limit_train": 32, "limit_eval": 32}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as in a Ray trial (cpus_per_task: 1); two threads on a shared 2-core
    machine make the first steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stage_outputs() -> Path:
    missing = [str(p.relative_to(REPO)) for p in STAGE_OUTPUTS if not p.exists()]
    if missing:
        pytest.skip(f"needs the stage outputs {missing}: run python -m stages.prepare / pretrain / mimic")
    return REPO


@pytest.fixture
def tiny_train() -> dict:
    """One epoch on 32 examples: enough to exercise a trial, not to learn much."""
    return dict(TINY_TRAIN)


@pytest.fixture
def write_config(tmp_path: Path):
    """``write_config(name, **fields)`` -> path of a sweep YAML writing under ``tmp_path``."""

    def write(name: str, **fields) -> Path:
        data = {"out_dir": str(tmp_path / "sweeps"), "train": TINY_TRAIN,
                "runtime": {"cache_dir": str(tmp_path / "cache"), "experiment": "sweep-tests", "progress": False},
                **fields}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write
