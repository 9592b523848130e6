"""The end-to-end run that ``test_pipeline_e2e`` and ``test_lineage_e2e`` both read: one clean
``dvc repro`` (then a no-op one) of the default pipeline in a committed copy of the repo, with a
real local Ray and a real sqlite MLflow store.

``params.yaml`` keeps its structure (both archs, one method of each family: head only, RECAST, an
adapter alone and with RECAST; a regularisation and a parameter-isolation continual baseline, the
sequential RECAST run, the gradient mimicry ablation; combine, evaluate); only sizes shrink: two
tasks, two seeds (for mean ± std), short schedules and a few hundred examples. The rest of the
methods and ablations (``configs/offline-full.yaml``) run end to end in ``test_paper_path`` (the
paper configuration holds them all). The default sizes are timed by
``benchmarks/bench_startup.py`` instead (minutes per stage on this machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from e2e_sizes import EPOCHS, EXPERIMENT, SEEDS, TASKS

REPO = Path(__file__).resolve().parents[2]


def tiny_params() -> dict:
    """params.yaml with its sizes cut down and its structure unchanged."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["runtime"].update(num_cpus=2, progress=False, experiment=EXPERIMENT)
    p["prepare"]["tasks"] = TASKS
    p["pretrain"].update(limit=512, epochs=1)
    p["pretrain"]["archs"]["vit"]["epochs"] = 3
    p["mimic"].update(eval_limit=64)
    for arch in p["mimic"]["archs"].values():
        for ablation in arch["ablations"].values():
            ablation.update(steps=20)
            if "step_size" in ablation:
                ablation["step_size"] = 10
    p["tune"].update(seeds=SEEDS)
    p["tune"]["train"].update(epochs=EPOCHS, step_size=1, limit_train=128, limit_eval=128, batch_size=32)
    return p


def write_default_config(root: Path, params: dict) -> None:
    """Make ``params`` the default configuration of the copy at ``root``: ``conf/config/default.yaml``
    (what ``dvc exp run`` composes) and ``params.yaml`` composed from it, as DVC writes it."""
    from dvc.utils.hydra import compose_and_dump

    (root / "conf" / "config" / "default.yaml").write_text("# @package _global_\n" + yaml.safe_dump(params, sort_keys=False))
    compose_and_dump(root / "params.yaml", str(root / "conf"), None, "config", str(root), [])


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RECAST_PARAMS")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    return env


@dataclass
class PipelineRun:
    root: Path
    commit: str
    env: dict[str, str]
    params: dict
    seconds: dict[str, float] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, source_tree) -> PipelineRun:
    root = source_tree(tmp_path_factory.mktemp("e2e"))
    params = tiny_params()
    write_default_config(root, params)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], cwd=root, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    run = PipelineRun(root, commit, clean_env(), params)
    for name in ("clean", "noop"):
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=root, env=run.env,
                              capture_output=True, text=True, timeout=1800)
        run.seconds[name] = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        run.logs[name] = proc.stdout + proc.stderr
    print(f"\ndvc repro wall time: clean {run.seconds['clean']:.0f} s, no-op {run.seconds['noop']:.1f} s")
    return run
