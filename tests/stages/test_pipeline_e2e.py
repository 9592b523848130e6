"""End to end: `dvc repro` of the default pipeline in a fresh copy of the repo, with a real local
Ray and a real (sqlite) MLflow store; then a no-op `dvc repro` that skips every stage."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

STAGES = ["prepare", "pretrain", "mimic", "tune", "combine", "evaluate"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, source_tree):
    root = tmp_path_factory.mktemp("repo")
    source_tree(root)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RECAST_PARAMS")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    timings = {}
    for run in ("clean", "noop"):
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=1800)
        timings[run] = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        timings[f"{run}_log"] = proc.stdout + proc.stderr
    print(f"\ndvc repro wall time: clean {timings['clean']:.0f} s, no-op {timings['noop']:.1f} s")
    return root, env, timings


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_clean_run_produces_sane_metrics(pipeline):
    root, _, _ = pipeline
    report = json.loads((root / "metrics" / "report.json").read_text())
    for key in ("vit/head_only", "vit/recast", "vit/lora_tiny", "vit/adaptformer", "vit/adaptformer_recast",
                "vit/ewc", "vit/lwf", "resnet/head_only", "resnet/recast", "resnet/clr", "resnet/clr_recast"):
        assert 0.1 < report[key]["avg_test_acc"] <= 1.0, key
    # RECAST-FT beats the head-only baseline on the default suite (mean over the two archs)
    gain = [report[f"{a}/recast"]["avg_test_acc"] - report[f"{a}/head_only"]["avg_test_acc"] for a in ("vit", "resnet")]
    assert sum(gain) / 2 > 0, gain
    assert report["vit/recast"]["avg_forgetting"] == 0.0 and report["resnet/recast"]["avg_forgetting"] == 0.0
    seq = json.loads((root / "metrics" / "tune.json").read_text())["vit/recast_sequential"]["acc_matrix"]
    assert all(seq[i][j] == seq[j][j] for j in range(5) for i in range(j, 5))  # trained in sequence, nothing moved
    assert report["vit/recast"]["trainable_params"] < report["vit/lora_tiny"]["trainable_params"]
    mimic = json.loads((root / "metrics" / "mimic.json").read_text())
    for arch in ("vit", "resnet"):
        assert mimic[arch]["min_weight_cosine"] > 0.9999
        assert mimic[arch]["acc_reconstructed"] == pytest.approx(mimic[arch]["acc_original"], abs=0.002)
    md = (root / "reports" / "report.md").read_text()
    assert "| recast |" in md and "RECAST trained task after task on one model" in md and "loading check" in md
    for arch, name in (("vit", "gradient"), ("vit", "vae"), ("resnet", "gradient")):  # ablations beside the closed form
        assert f"| {arch} ({name}) |" in md, name
    assert (root / "reports" / "params_vs_acc.png").stat().st_size > 10_000
    payloads = list((root / "outputs" / "tune" / "payloads" / "vit" / "recast").glob("*.safetensors"))
    assert len(payloads) == 5
    rows = json.loads((root / "outputs" / "tune" / "results.json").read_text())
    assert len(rows) == 25 + 5  # per-task jobs and the sequential runs (ewc, lwf, inflora, recast x2); each measures its own peak
    assert all(0 < r["rss_start_mb"] <= r["peak_rss_mb"] < 8192 and r["ray_node"] for r in rows)


@pytest.mark.slow
def test_registry_lists_every_payload_and_loads_one(pipeline, monkeypatch):
    root, _, _ = pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    from stages.tracking import download_payload, list_registered

    names = {r["name"] for r in list_registered()}
    assert "recast.vit.recast.mnist_rot" in names and "recast.resnet.clr_recast.uci_digits" in names
    assert len(names) == 25 + 20  # per-task jobs of tune (5 methods x 5 tasks) + combine (4 x 5)
    folder = download_payload("vit", "mnist_rot", "recast", alias="best")
    files = sorted(p.suffix for p in folder.iterdir())
    assert files == [".json", ".safetensors"]
    meta = json.loads(next(folder.glob("*.json")).read_text())
    assert meta["numel"] == 72 + 64 * 10 + 10  # 72 coefficients + the 10-class head
    # load it onto the backbone by name and check the stored test accuracy is reproduced
    import recast
    from recast.data import BatchLoader
    from recast.training import evaluate
    from stages.backbones import load_backbone

    rc = load_backbone("vit", root / "outputs" / "pretrain", root / "outputs" / "mimic").recast()
    recast.load_payload(rc, next(folder.glob("*.safetensors")))
    rc.set_task("mnist_rot")
    acc = evaluate(rc, BatchLoader(root / "data" / "prepared" / "offline" / "mnist_rot", "test", 256, 32, train=False, seed=0))
    assert acc == pytest.approx(meta["metrics"]["test_acc"], abs=1e-9)


@pytest.mark.slow
def test_noop_repro_skips_every_stage(pipeline):
    _, _, timings = pipeline
    log = timings["noop_log"]
    assert "Running stage" not in log
    for stage in STAGES:
        assert f"'{stage}' didn't change" in log or f"Stage '{stage}' didn't change" in log, log[-2000:]
