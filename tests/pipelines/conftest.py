"""Fixtures of the sweep tests: the pipeline's stage outputs (backbones, banks, prepared tasks)
and a tiny sweep config writer.

The sweeps stand on the outputs of ``stages.prepare``, ``stages.pretrain`` and ``stages.mimic``.
Where the repo has them (after ``dvc repro``) the tests use them; on a fresh clone (CI) a
session fixture runs those three stages once, in a copy of the source tree, with a tiny params
file (the ViT only, one short pretraining epoch), and the tests resolve their relative paths
against that copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages.config.common import file_lock

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


SWEEP_TASKS = ["mnist_lo5", "mnist_hi5_inv", "uci_digits"]  # every task a shipped sweep config names


def tiny_stage_params() -> dict:
    """params.yaml cut down to what the sweeps need: the ViT on three tasks, a short pretraining."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["runtime"].update(num_cpus=1, progress=False, experiment="sweep-fixture")
    params["prepare"]["tasks"] = SWEEP_TASKS
    params["pretrain"].update(limit=512, epochs=1)
    params["pretrain"]["archs"] = {"vit": {**params["pretrain"]["archs"]["vit"], "epochs": 1}}
    params["mimic"].update(eval_limit=64)
    params["mimic"]["archs"] = {"vit": {**params["mimic"]["archs"]["vit"], "ablations": {}}}  # sweeps use the main banks
    # later stages are not run, but every section is validated against the archs above
    params["tune"]["archs"] = ["vit"]
    lrs = params["tune"]["lr_by_method"]  # the lr table of the archs that run
    lrs.update(archs={"vit": lrs["archs"]["vit"]}, source={"vit": lrs["source"]["vit"]})
    params["tune"]["continual"]["methods"] = {"vit": params["tune"]["continual"]["methods"]["vit"]}
    params["combine"]["methods"] = {k: m for k, m in params["combine"]["methods"].items() if m.get("archs") == ["vit"]}
    params["evaluate"]["forgetting_archs"] = ["vit"]
    return params


@pytest.fixture(scope="session")
def stage_root(tmp_path_factory, source_tree) -> Path:
    """A directory laid out like the repo after prepare, pretrain and mimic.

    Built once per test session: under pytest-xdist the first worker to need it builds it in the
    session's shared base directory while holding a file lock; the other waits on the lock and
    reads the finished directory (the tests only read it)."""
    if all(p.exists() for p in STAGE_OUTPUTS):
        return REPO
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-N/, common to the workers
    root = shared / "stage-root"
    with file_lock(shared / "stage-root.lock"):
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)  # half built by a worker that died
            root.mkdir()
            _build_stage_root(source_tree(root))
            (root / ".built").write_text(f"built by {os.environ.get('PYTEST_XDIST_WORKER', 'master')}\n")
    return root


def _build_stage_root(root: Path) -> None:
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_stage_params()))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RECAST_PARAMS")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", TQDM_DISABLE="1")
    for stage in ("prepare", "pretrain", "mimic"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", "tiny.yaml"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, f"stages.{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    missing = [str(p.relative_to(REPO)) for p in STAGE_OUTPUTS if not (root / p.relative_to(REPO)).exists()]
    assert not missing, f"the tiny stage run did not write {missing}"


@pytest.fixture
def stage_outputs(stage_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stage root, with relative params paths (``outputs/pretrain``...) resolving inside it."""
    monkeypatch.setattr("stages.config.common.REPO_ROOT", stage_root)
    return stage_root


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
        if "params" in fields:  # hpo: the recipe is the pipeline config's
            data.pop("train")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def pipeline_params(stage_outputs: Path, tmp_path: Path):
    """``pipeline_params(**tune)`` -> path of a pipeline config for the ``hpo`` sweep: the stage
    root's own params (so its pretrain section matches the backbone there) with a tiny recipe
    on two tasks, ``tune`` fields replaced by ``tune`` and no combine methods."""
    source = stage_outputs / "tiny.yaml" if (stage_outputs / "tiny.yaml").exists() else stage_outputs / "params.yaml"

    def write(**tune) -> Path:
        params = yaml.safe_load(source.read_text())
        params["tune"].update(tasks=["mnist_lo5", "mnist_hi5_inv"], train=TINY_TRAIN, seeds=[42], lr_by_method=None,
                              **tune)
        params.pop("combine", None)
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(params))
        return path

    return write
