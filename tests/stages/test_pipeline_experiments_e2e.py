"""DVC's own workflow on the shared end-to-end run (``conftest.pipeline_run``; after
``test_pipeline_e2e``, same worker): a queued experiment logs to the workspace's MLflow store and
reuses its job cache, ``dvc exp show`` / ``dvc metrics diff`` compare real numbers in a readable
width, and a damaged output is repaired by the command its error advises, with DVC's cache intact."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_sizes import EXPERIMENT

DVC = str(Path(sys.executable).parent / "dvc")
HEADLINE = re.compile(r"^(vit|resnet|fgt|params|mimic_cos)\.|^train_min$")


def dvc(run, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([DVC, *args], cwd=run.root, env=run.env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def git(run, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                   cwd=run.root, check=True, capture_output=True)


def stage_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], max_results=5000)


@pytest.fixture(scope="module")
def queued(pipeline_run):
    """The run committed as the baseline, then one queued experiment with one of its two seeds."""
    # test_lineage_e2e re-ran tune outside DVC (other timings): back to what dvc.lock records
    dvc(pipeline_run, "checkout", "--force")
    assert json.loads(dvc(pipeline_run, "status", "--json").stdout) == {}
    git(pipeline_run, "add", "-A")
    git(pipeline_run, "commit", "-qm", "tiny run")  # dvc.lock and metrics/report.json: what `dvc exp show` reads
    before = {r.info.run_id for r in stage_runs(pipeline_run.root)}
    dvc(pipeline_run, "exp", "run", "--queue", "-n", "one-seed", "-S", "tune.seeds=[42]")
    dvc(pipeline_run, "queue", "start")
    deadline = time.monotonic() + 1200
    while re.search(r"\b(Queued|Running)\b", dvc(pipeline_run, "queue", "status").stdout):
        assert time.monotonic() < deadline, "the queued experiment did not finish in 20 min"
        time.sleep(5)
    logs = dvc(pipeline_run, "queue", "logs", "one-seed").stdout
    assert "Success" in dvc(pipeline_run, "queue", "status").stdout, logs[-3000:]
    return pipeline_run, before, logs


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_queued_experiment_logs_to_workspace_store_and_reuses_its_jobs(queued):
    run, before, logs = queued
    assert "Creating initial MLflow database tables" not in logs  # no store of the temporary copy's own
    new = [r for r in stage_runs(run.root) if r.info.run_id not in before]
    # prepare, pretrain and mimic are unchanged; tune, combine and evaluate log a stage run each, and
    # no job run: every job of seed 42 comes from the workspace's job cache (logged once per store)
    assert sorted(r.data.tags["stage"] for r in new) == ["combine", "evaluate", "tune"], logs[-3000:]
    assert {r.data.tags["dvc.exp_name"] for r in new} == {"one-seed"}
    cache = run.root / "outputs" / ".jobcache"
    for stage, n in (("tune", 12), ("combine", 4)):  # seed 42's jobs, all from the workspace's cache
        assert f"{stage}: {n} of {n} jobs from the job cache {cache / stage}" in logs, logs[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_exp_show_and_metrics_diff_compare_headline_numbers(queued):
    run, _, _ = queued
    table = dvc(run, "exp", "show", "--csv", "--no-fetch").stdout
    rows = list(csv.DictReader(io.StringIO(table)))
    metrics = [c for c in rows[0] if HEADLINE.search(c)]
    assert len(metrics) == 21, metrics  # ~20 numbers, not ~150: 10 accuracies, 2 forgetting, 6 params, 2 cosines, time
    named = {r["Experiment"] or r["rev"]: r for r in rows}
    for rev in ("workspace", "one-seed"):  # the baseline commit and the experiment, on real numbers
        assert all(re.fullmatch(r"-?\d+(\.\d+)?", named[rev][c]) for c in metrics), (rev, named[rev])
    head = next(r for r in rows if r["rev"] not in ("workspace",) and not r["Experiment"])
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", head[c]) for c in metrics), head
    diff = json.loads(dvc(run, "metrics", "diff", "HEAD", "one-seed", "--json").stdout)
    changed = [c for c in metrics if len({named[r][c] for r in ("workspace", "one-seed")}) > 1]
    assert set(diff) == {"metrics/report.json"} and sorted(diff["metrics/report.json"]) == sorted(changed)
    assert all(isinstance(v["diff"], float) for v in diff["metrics/report.json"].values())
    # in a 200-column terminal: no line wider, every headline column whole (metric columns do not
    # wrap: rich would cut them with an ellipsis), the rest wraps (the deps' hashes)
    shown = subprocess.run([DVC, "exp", "show", "--only-changed", "--no-pager", "--no-fetch"], cwd=run.root,
                           env={**run.env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300)
    lines = shown.stdout.splitlines()
    print(f"\ndvc exp show --only-changed (200 columns):\n{shown.stdout}")
    assert shown.returncode == 0 and max(map(len, lines)) <= 200, shown.stdout
    header = next(line for line in lines if "Experiment" in line).split()
    # every number the seed change moved is a whole column, and so is the changed param (DVC cuts
    # only the changed outputs' hash columns to "…")
    assert changed and [c for c in header if c in changed] == changed and "tune.seeds" in header, (changed, header)
    row = next(line for line in lines if "[one-seed]" in line).split()
    numbers = set()
    for cell in row:
        try:
            numbers.add(float(cell))
        except ValueError:
            pass
    # as numbers: the table prints 0.0 as "0"
    assert all(float(named["one-seed"][c]) in numbers for c in changed), (row, changed)
    # at full width (DVC's pager) with the hash columns: every changed number and the changed param
    natural = subprocess.run([DVC, "exp", "show", "--only-changed", "--no-pager", "--no-fetch"], cwd=run.root,
                             env={**run.env, "COLUMNS": "2000"}, capture_output=True, text=True, timeout=300)
    assert all(c in natural.stdout for c in [*changed, "tune.seeds"]), natural.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_damaged_output_is_repaired_by_the_advised_command(queued):
    from stages.config.common import REPO_ROOT, IntegrityError, check_digest

    run, _, _ = queued
    rel = "outputs/tune/payloads/vit/recast/mnist_lo5-s42.safetensors"
    path = run.root / rel
    original = hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(dvc(run, "status", "--json").stdout) == {}
    with open(path, "r+b") as fh:  # flip one byte in place, as a bad disk or an editor would
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    damaged = hashlib.sha256(path.read_bytes()).hexdigest()
    assert damaged != original
    status = json.loads(dvc(run, "status", "--json").stdout)
    assert "tune" in status, status  # honest: the stage's output is modified
    with pytest.raises(IntegrityError) as err:  # what a reader of the file says (e.g. evaluate)
        check_digest(REPO_ROOT / rel, damaged, original)
    command = re.search(r"`(dvc checkout [^`]+)`", str(err.value)).group(1).split()
    assert command[-1] == rel
    dvc(run, *command[1:])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == original
    assert json.loads(dvc(run, "status", "--json").stdout) == {}
