"""Issue 10 end to end, on the shared run of ``conftest.pipeline_run`` (the default pipeline's
structure, two tasks, two seeds, short training): a fresh `dvc repro` in a committed copy of the
repo, then

- every MLflow run (parent and child) carries the lineage tags, equal to what dvc.lock records
  for its stage, and its tasks as dataset inputs;
- every tuning job has per-epoch curves (train loss, val accuracy, lr with step=epoch), the
  sequential baseline its growing accuracy matrix, the parents a curves PNG;
- every stage wrote results.parquet with the lineage columns; the report is mean ± std over seeds;
- a registered payload version leads back to run, commit, data, backbone and bank digests, and
  `stages.registry reproduce` rebuilds it byte for byte;
- the tune stage, run again from scratch (no job cache, no outputs), gives bit-identical
  payloads and metrics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from dvc.utils.serialize import load_yaml
from e2e_sizes import EPOCHS, EXPERIMENT, SEEDS, TASKS

from recast.machine import cpu_model

TIMING = ("seconds", "rss", "peak", "host", "ray_node", "run_id")  # wall clock, memory, where, MLflow ids
PER_TASK_METHODS = 2 + 2  # vit: head_only, recast; resnet: head_only, recast
SEQUENTIAL_METHODS = 3 + 1  # vit: ewc, inflora, recast; resnet: recast
COMBINE_METHODS = 2  # vit: adaptformer(_recast)
N_TUNE = PER_TASK_METHODS * len(TASKS) * len(SEEDS)
N_COMBINE = COMBINE_METHODS * len(TASKS) * len(SEEDS)
N_SEQUENTIAL = SEQUENTIAL_METHODS * len(SEEDS)


def _timing(name: str) -> bool:
    """A column or key that varies between identical runs (``*_s`` is wall time, e.g. wall_time_s)."""
    return name.endswith("_s") or any(s in name for s in TIMING)


@pytest.fixture(scope="module")
def repro(pipeline_run):
    return pipeline_run.root, pipeline_run.commit


@pytest.fixture
def client(repro, monkeypatch):
    root, _ = repro
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    from stages.tracking.store import make_client

    return make_client()


def _runs(client):
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(3200)
def test_every_run_has_the_lineage_dvc_lock_records(repro, client):
    root, commit = repro
    lock = load_yaml(root / "dvc.lock")["stages"]  # DVC's own (YAML 1.2) reader: `1e-06` is a float
    params_md5 = hashlib.md5((root / "params.yaml").read_bytes()).hexdigest()
    capability = torch.backends.cpu.get_cpu_capability()
    runs = _runs(client)
    stages = {r.data.tags["dvc.stage"] for r in runs}
    assert stages == {"pretrain", "mimic", "tune", "combine", "evaluate"}
    for r in runs:
        t, stage = r.data.tags, r.data.tags["dvc.stage"]
        assert t["git.commit"] == commit and t["git.dirty"] == "false", (r.info.run_name, t["git.dirty"])
        assert t["mlflow.source.git.commit"] == commit
        deps = {d["path"]: d["md5"] for d in lock[stage]["deps"]}
        assert {k[len("dvc.dep."):]: v for k, v in t.items() if k.startswith("dvc.dep.")} == deps, r.info.run_name
        assert t["dvc.params_sha256"] == _sha256_json(lock[stage]["params"]["params.yaml"])
        assert t["params.file"] == "params.yaml" and t["params.file_md5"] == params_md5
        # what the float results depend on: the CPU and torch's kernels and threads (a job: runtime.torch_threads)
        assert t["cpu.model"] == cpu_model() and t["torch.cpu_capability"] == capability, r.info.run_name
        if "job" in t:
            assert t["torch.threads"] == "1", r.info.run_name
    # dataset inputs: every tuning job its task(s), digest = the manifest sha256
    data = root / "data" / "prepared" / "offline"
    sha = {t: hashlib.sha256((data / t / "manifest.json").read_bytes()).hexdigest() for t in [*TASKS, "source"]}
    jobs = [r for r in runs if r.data.tags.get("dvc.stage") in ("tune", "combine") and "job" in r.data.tags]
    assert len(jobs) == N_TUNE + N_SEQUENTIAL + N_COMBINE
    for r in jobs:
        inputs = {d.dataset.name: d.dataset for d in r.inputs.dataset_inputs}
        expected = TASKS if "/sequential/" in r.data.tags["job"] else [r.data.params["task"]]
        assert sorted(inputs) == sorted(expected), r.info.run_name
        for name, ds in inputs.items():
            assert json.loads(ds.profile)["manifest_sha256"] == sha[name] and sha[name].startswith(ds.digest)
            assert json.loads(ds.source)["uri"] == (data / name).resolve().as_uri()
    parents = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("kind") == "stage"}
    assert sorted(d.dataset.name for d in parents["tune"].inputs.dataset_inputs) == sorted(TASKS)
    assert [d.dataset.name for d in parents["pretrain"].inputs.dataset_inputs] == ["source"]


@pytest.mark.slow
def test_every_tuning_job_has_per_epoch_curves(repro, client):
    runs = _runs(client)
    per_task = [r for r in runs if r.data.tags.get("dvc.stage") in ("tune", "combine") and "job" in r.data.tags
                and "/sequential/" not in r.data.tags["job"]]
    assert len(per_task) == N_TUNE + N_COMBINE
    for r in per_task:
        for key in ("epoch/train_loss", "epoch/val_acc", "epoch/lr"):
            hist = sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in hist] == list(range(EPOCHS)), (r.info.run_name, key)
        lrs = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "epoch/lr"), key=lambda m: m.step)]
        assert lrs[1] == pytest.approx(lrs[0] * 0.1)  # step_size 1, gamma 0.1
        best = max(m.value for m in client.get_metric_history(r.info.run_id, "epoch/val_acc"))
        assert r.data.metrics["val_acc"] == pytest.approx(best)
    seq = [r for r in runs if "/sequential/" in r.data.tags.get("job", "")]
    assert len(seq) == N_SEQUENTIAL
    for r in seq:
        hist = client.get_metric_history(r.info.run_id, "acc_matrix/avg_seen")
        assert sorted(m.step for m in hist) == [0, 1]  # one step per task
        assert len(client.get_metric_history(r.info.run_id, f"acc_matrix/{TASKS[0]}")) == 2
        assert len(client.get_metric_history(r.info.run_id, f"acc_matrix/{TASKS[1]}")) == 1
    for r in runs:
        if r.data.tags.get("kind") == "stage" and r.data.tags["stage"] in ("pretrain", "tune", "combine"):
            assert "curves.png" in [a.path for a in client.list_artifacts(r.info.run_id)], r.data.tags["stage"]


@pytest.mark.slow
def test_results_tables_and_report(repro):
    root, commit = repro
    for stage, n in (("pretrain", 2), ("mimic", 2), ("tune", N_TUNE + N_SEQUENTIAL), ("combine", N_COMBINE)):
        df = pd.read_parquet(root / "outputs" / stage / "results.parquet")
        assert len(df) == n, stage
        assert (df["git_commit"] == commit).all() and df["run_id"].str.len().eq(32).all()
        assert {"deps_sha256", "params_sha256", "params_file_md5", "backbone_sha256", "data_sha256"} <= set(df.columns)
    tune = pd.read_parquet(root / "outputs" / "tune" / "results.parquet")
    per_task = tune[tune["sequential"].ne(True)]
    assert per_task["bank_sha256"].str.len().eq(64).all() and per_task["payload_sha256"].str.len().eq(64).all()
    tasks = pd.read_parquet(root / "reports" / "tasks.parquet")
    row = tasks[(tasks["arch"] == "vit") & (tasks["method"] == "recast") & (tasks["task"] == TASKS[0])].iloc[0]
    accs = per_task[(per_task["arch"] == "vit") & (per_task["method"] == "recast") & (per_task["task"] == TASKS[0])]
    accs = accs["test_acc"]
    assert row["n_seeds"] == 2 and row["mean"] == pytest.approx(accs.mean()) and row["std"] == pytest.approx(accs.std())
    md = (root / "reports" / "report.md").read_text()
    assert f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}" in md
    assert "paper" not in pd.read_parquet(root / "reports" / "methods.parquet").columns  # offline suite


@pytest.mark.slow
def test_registered_payload_leads_back_and_reproduces_bytes(repro, client, tmp_path, capsys):
    root, commit = repro
    from stages.registry.__main__ import main

    name = f"recast.vit.recast.{TASKS[0]}"
    assert main(["show", f"{name}@current"]) == 0
    shown = json.loads(capsys.readouterr().out)
    tags = shown["version_tags"]
    assert tags["run_id"] == shown["run_id"] and tags["git.commit"] == commit
    manifest = root / "data" / "prepared" / "offline" / TASKS[0] / "manifest.json"
    assert tags["data.sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert tags["backbone_sha256"] == json.loads((root / "outputs/pretrain/vit.json").read_text())["sha256"]
    assert tags["bank_sha256"] == json.loads((root / "outputs/mimic/vit/recast.json").read_text())["bank_sha256"]
    assert shown["run_tags"]["dvc.dep.outputs/mimic"].endswith(".dir")
    assert [d["name"] for d in shown["datasets"]] == [TASKS[0]]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # reproduce runs the job with its recorded count (runtime.torch_threads: 1)
        assert main(["reproduce", f"{name}@current", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out)
    assert out["identical_safetensors"] and out["identical_json"]
    assert out["recorded_machine"]["torch_threads"] == out["machine"]["torch_threads"] == 1
    assert out["recorded_machine"]["cpu_model"] == out["machine"]["cpu_model"] == cpu_model()
    assert out["payload_sha256"] == out["registered_sha256"] == tags["payload_sha256"]
    # the comparison can fail: a job whose payload differs in one value is reported, exit code 2
    import stages.registry.__main__ as registry

    real = registry.dispatch

    def perturbed(spec, inputs):
        result = real(spec, inputs)
        key = sorted(result.tensors)[0]
        result.tensors[key] = result.tensors[key].clone()
        result.tensors[key].view(-1)[0] += 1.0
        return result

    try:
        registry.dispatch = perturbed
        assert main(["reproduce", f"{name}@current", "--out", str(tmp_path / "perturbed")]) == 2
    finally:
        registry.dispatch = real
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out)
    assert not out["identical_safetensors"] and out["payload_sha256"] != out["registered_sha256"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tune_stage_from_scratch_is_bit_identical(repro, pipeline_run, tmp_path):
    root, _ = repro
    first = tmp_path / "first-tune"
    shutil.copytree(root / "outputs" / "tune", first)
    shutil.copy(root / "metrics" / "tune.json", first / "metrics.json")
    shutil.rmtree(root / "outputs" / ".jobcache" / "tune")
    shutil.rmtree(root / "outputs" / "tune")
    proc = subprocess.run([sys.executable, "-m", "stages.tune"], cwd=root, env=pipeline_run.env, capture_output=True,
                          text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = root / "outputs" / "tune"
    payloads = sorted(p.relative_to(first) for p in (first / "payloads").rglob("*.*"))
    assert len(payloads) == 2 * N_TUNE  # safetensors + json per per-task job
    for rel in payloads:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel

    def deterministic(df: pd.DataFrame) -> pd.DataFrame:
        return df[[c for c in df.columns if not _timing(c)]]

    a = deterministic(pd.read_parquet(first / "results.parquet"))
    b = deterministic(pd.read_parquet(again / "results.parquet"))
    assert {"test_acc", "val_acc", "acc_matrix", "payload_sha256"} <= set(a.columns)
    pd.testing.assert_frame_equal(a, b, check_exact=True)

    def strip(d):
        return {k: strip(v) for k, v in d.items() if not _timing(k)} if isinstance(d, dict) else d

    m1 = strip(json.loads((first / "metrics.json").read_text()))
    m2 = strip(json.loads((root / "metrics" / "tune.json").read_text()))
    assert m1 == m2 and m1["vit/recast"]["avg_test_acc"] > 0
