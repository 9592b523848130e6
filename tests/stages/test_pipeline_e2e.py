"""End to end: `dvc repro` of the default pipeline (sizes cut down, structure unchanged; see
``conftest.pipeline_run``) in a fresh copy of the repo, with a real local Ray and a real (sqlite)
MLflow store; then a no-op `dvc repro` that skips every stage."""

import json

import pytest
from e2e_sizes import SEEDS, TASKS

STAGES = ["prepare", "pretrain", "mimic", "tune", "combine", "evaluate"]
PER_TASK = {"vit": ["head_only", "recast"], "resnet": ["head_only", "recast"]}  # params.yaml tune.methods
COMBINE = {"vit": ["adaptformer", "adaptformer_recast"], "resnet": []}
SEQUENTIAL = {"vit": ["ewc", "inflora", "recast"], "resnet": ["recast"]}
CHANCE = {"mnist_lo5": 0.2, "uci_digits": 0.1}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_clean_run_produces_sane_metrics(pipeline_run):
    root = pipeline_run.root
    report = json.loads((root / "metrics" / "report.json").read_text())
    # short schedules on a few hundred examples: every per-task method clearly above chance (0.15 on
    # average; measured 0.23-0.27), the one-epoch sequential baselines above it (measured 0.18-0.27)
    chance = sum(CHANCE.values()) / len(CHANCE)
    from stages.report.tables import headline_name

    acc = {arch: report[arch] for arch in PER_TASK}
    forgetting, params = report["fgt"], report["params"]
    for arch in PER_TASK:  # metrics/report.json: the headline numbers, accuracies in %
        for method in [*PER_TASK[arch], *COMBINE[arch]]:
            assert 100 * 1.4 * chance < acc[arch][headline_name(method)] <= 100, (arch, method)
        for method in SEQUENTIAL[arch]:
            key = "seq" if method == "recast" else headline_name(method)
            assert 100 * chance < acc[arch][key] <= 100, (arch, method)
    for arch in ("vit", "resnet"):  # trained task after task on one model: nothing moved
        assert forgetting[arch] == 0.0
        seq = json.loads((root / "metrics" / "tune.json").read_text())[f"{arch}/recast_sequential"]["acc_matrix"]
        n = len(TASKS)
        assert len(seq) == n and all(seq[i][j] == seq[j][j] for j in range(n) for i in range(j, n)), seq
    # RECAST trains fewer parameters per task than the adapter (tests/stages/test_paper_path.py: than lora_tiny too)
    assert params["vit"]["rc"] < params["vit"]["af"] < params["vit"]["af+rc"]
    # the ~20 numbers DVC compares: accuracy per arch and method, forgetting, parameters, mimicry, time
    n_acc = sum(len(PER_TASK[a]) + len(COMBINE[a]) + len(SEQUENTIAL[a]) for a in PER_TASK)
    n_params = sum(len(PER_TASK[a]) + len(COMBINE[a]) for a in PER_TASK)
    assert sum(map(len, acc.values())) == n_acc == 10 and sum(map(len, params.values())) == n_params == 6
    assert forgetting == {"vit": 0.0, "resnet": 0.0} and set(report["mimic_cos"]) == {"vit", "resnet"}
    assert report["train_min"] > 0
    mimic = json.loads((root / "metrics" / "mimic.json").read_text())
    for arch in ("vit", "resnet"):
        assert mimic[arch]["min_weight_cosine"] > 0.9999
        assert mimic[arch]["acc_reconstructed"] == pytest.approx(mimic[arch]["acc_original"], abs=0.002)
    md = (root / "reports" / "report.md").read_text()
    cells = {c.strip() for line in md.splitlines() if line.startswith("|") for c in line.strip("|").split("|")}
    assert "recast" in cells and "loading check" in md
    assert md.startswith("# RECAST report\n\n**What ran.** Config `params.yaml, config=") and "**How to read it.**" in md
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert len(titles) == len(set(titles))  # every table once
    # RECAST trained task after task: its matrix once, as the continual table's (mean over seeds)
    assert "## vit/recast_sequential: accuracy matrix (%), mean over seeds" in md
    assert "RECAST trained task after task on one model" not in md and "issue" not in md.lower()
    for arch, name in (("vit", "gradient"), ("resnet", "gradient")):  # the ablation beside the closed form (vae: paper path)
        assert f"{arch} ({name})" in cells, name
    assert (root / "reports" / "params_vs_acc.png").stat().st_size > 10_000
    payloads = list((root / "outputs" / "tune" / "payloads" / "vit" / "recast").glob("*.safetensors"))
    assert len(payloads) == len(TASKS) * len(SEEDS)
    rows = json.loads((root / "outputs" / "tune" / "results.json").read_text())
    per_task = sum(map(len, PER_TASK.values())) * len(TASKS) * len(SEEDS)
    assert len(rows) == per_task + sum(map(len, SEQUENTIAL.values())) * len(SEEDS)  # each measures its own peak
    assert all(0 < r["rss_start_mb"] <= r["peak_rss_mb"] < 8192 and r["ray_node"] for r in rows)


@pytest.mark.slow
def test_registry_lists_every_payload_and_loads_one(pipeline_run, monkeypatch):
    root = pipeline_run.root
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    from stages.tracking.payloads import download_payload, list_registered

    names = {r["name"] for r in list_registered()}
    assert {f"recast.vit.recast.{TASKS[0]}", f"recast.vit.adaptformer_recast.{TASKS[1]}",
            f"recast.resnet.recast.{TASKS[1]}"} <= names
    methods = sum(map(len, PER_TASK.values())) + sum(map(len, COMBINE.values()))
    assert len(names) == methods * len(TASKS)  # one name per arch, method and task; seeds are its versions
    folder = download_payload("vit", TASKS[0], "recast", alias="best")
    files = sorted(p.suffix for p in folder.iterdir())
    assert files == [".json", ".safetensors"]
    meta = json.loads(next(folder.glob("*.json")).read_text())
    assert meta["numel"] == 72 + 64 * 5 + 5  # 72 coefficients + the 5-class head
    # load it onto the backbone by name and check the stored test accuracy is reproduced
    import recast
    from recast.data import BatchLoader
    from recast.training import evaluate
    from stages.jobs.backbones import load_backbone

    rc = load_backbone("vit", root / "outputs" / "pretrain", root / "outputs" / "mimic").recast()
    recast.load_payload(rc, next(folder.glob("*.safetensors")))
    rc.set_task(TASKS[0])
    limit = pipeline_run.params["tune"]["train"]["limit_eval"]
    acc = evaluate(rc, BatchLoader(root / "data" / "prepared" / "offline" / TASKS[0], "test", 256, 32, train=False,
                                   seed=0, limit=limit))
    assert acc == pytest.approx(meta["metrics"]["test_acc"], abs=1e-9)


@pytest.mark.slow
def test_noop_repro_skips_every_stage(pipeline_run):
    log = pipeline_run.logs["noop"]
    assert "Running stage" not in log
    for stage in STAGES:
        assert f"'{stage}' didn't change" in log or f"Stage '{stage}' didn't change" in log, log[-2000:]
