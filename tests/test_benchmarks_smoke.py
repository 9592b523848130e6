"""Smoke tests of benchmarks/bench_mimicry.py and bench_speed.py on tiny timm models (seconds)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_RESNET = ["--resnet-model", "test_resnet", "--resnet-layers", "2,3,2,2"]
ONE_THREAD = ["--threads", "1"]  # tiny ops: one thread is as fast and immune to OpenMP stalls on a busy machine


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts call torch.set_num_threads; keep the rest of the session's setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _is_cosine(value: float) -> bool:
    return -1.0 - 1e-9 <= value <= 1.0 + 1e-9


def test_bench_mimicry_tiny(tmp_path):
    out = tmp_path / "mimicry.json"
    argv = ["--vit-model", "test_vit", "--image-size", "32", *TINY_RESNET, "--batch", "2", "--repeats", "1",
            "--steps", "3", "--refine-steps", "2", "--lowrank-groups", "1", *ONE_THREAD, "--json-out", str(out)]
    returned = _load("bench_mimicry").main(argv)
    results = json.loads(out.read_text())
    assert results["rows"] == json.loads(json.dumps(returned["rows"]))
    assert {"date", "load_avg_1_5_15", "threads", "torch"} <= set(results["environment"])
    rows = {r["case"]: r for r in results["rows"]}
    assert set(rows) == {"vit_all4_closed", "vit_all4_gradient", "vit_all4_refine", "vit_all4_lowrank", "resnet_closed"}
    for r in rows.values():
        for key in ("weight_cos_min", "weight_cos_mean", "weight_cos_rms", "feature_cos_min", "feature_cos_mean"):
            assert _is_cosine(r[key]), (r["case"], key, r[key])
        assert r["weight_cos_min"] <= r["weight_cos_mean"] + 1e-12
        assert r["apply_s"] > 0 and r["mimic_s"] > 0
        assert all(v in ("PASS", "FAIL") for v in r["checks"].values())
    for case in ("vit_all4_closed", "resnet_closed"):  # n >= layers per group: the closed form is exact
        r = rows[case]
        assert r["weight_cos_min"] > 0.9999 and r["feature_cos_min"] > 0.9999
        assert r["checks"]["weight_cos_min>=0.9999"] == "PASS"
        assert set(r["checks"]) == {"weight_cos_min>=0.9999", "feature_cos_min>=0.9999", "mimic_s<=5"}
    assert rows["vit_all4_gradient"]["steps"] == 3 and rows["vit_all4_refine"]["steps"] == 2
    lowrank = rows["vit_all4_lowrank"]
    assert lowrank["layers_per_group"] == 6 and lowrank["checks"] == {}
    assert 0.0 < lowrank["weight_cos_mean"] < 0.99  # rank-2 fit of 6 random weights
    assert math.isclose(lowrank["expected_cos_rms_rank_fit"], math.sqrt(2 / 6))
    assert lowrank["weight_cos_min"] <= lowrank["weight_cos_rms"] <= 1.0
    assert rows["vit_all4_closed"]["parameters"]["coefficients"] == 6 * 4 * 2 * 2  # L * M * K * n
    assert "| vit_all4_closed |" in results["table"]


def test_bench_speed_tiny(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["--vit-model", "test_vit", "--image-size", "32", *TINY_RESNET, "--batch", "2", "--repeats", "1",
            "--warmup", "0", "--memory", "inprocess", *ONE_THREAD, "--json-out", str(out)]
    _load("bench_speed").main(argv)
    results = json.loads(out.read_text())
    rows = {r["config"]: r for r in results["rows"]}
    assert set(rows) == {"vit_recast_mlp", "vit_all4", "resnet_recast_resnet"}
    for r in rows.values():
        for key in ("inference_ratio", "inference_ratio_paired", "inference_ratio_of_mins", "recast_forward_ratio",
                    "train_ratio", "train_ratio_paired", "train_ratio_of_mins"):
            assert r[key] > 0, key
        for mode in ("original", "materialized", "recast_forward"):
            assert r["inference"][mode]["median_s"] > 0
        for mode in ("recast_ft", "full_ft"):
            assert r["training"][mode]["median_s"] > 0
            assert r["memory"][mode]["increase_mib"] >= 0 and r["memory"][mode]["peak_mib"] > 0
        assert r["materialized_output_rel_diff"] < 1e-4  # closed form is exact: same outputs
        assert 0 < r["trainable"]["recast_ft"] < r["trainable"]["full_ft"]
        assert r["trainable"]["recast_ft"] == r["parameters"]["trainable"]  # coefficients + 100-class head
        assert 0 <= r["weight_generation_share"]
        assert set(r["checks"]) == {"inference_ratio<=1.05", "train_ratio<=1.2"}
        assert all(v in ("PASS", "FAIL") for v in r["checks"].values())
    assert "| vit_all4 (test_vit) |" in results["table"]


def test_bench_amp_tiny(tmp_path):
    """The GPU script's throughput step on CPU: both precisions train, parameters stay fp32."""
    out = tmp_path / "amp.json"
    argv = ["--device", "cpu", "--model", "test_vit", "--image-size", "32", "--batch", "4", "--warmup", "0",
            "--steps", "1", "--json-out", str(out)]
    returned = _load("bench_amp").main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(returned))
    assert set(returned["rows"]) == {"fp32", "bf16"} and returned["bf16_over_fp32"] > 0
    for row in returned["rows"].values():
        assert row["images_per_s"] > 0 and row["param_dtypes"] == ["torch.float32"] and math.isfinite(row["final_loss"])
    from recast.training import PrecisionError

    with pytest.raises(PrecisionError, match="fp16 autocast needs a CUDA device"):
        _load("bench_amp").main([*argv[:-2], "--precisions", "fp16", "--json-out", str(out)])


@pytest.mark.parametrize("script", ["bench_mimicry", "bench_speed", "bench_amp"])
def test_bench_rejects_unknown_device(script):
    with pytest.raises(SystemExit):
        _load(script).parse_args(["--device", "tpu"])


def test_bench_startup_compute_floor_reads_job_entries_only(tmp_path):
    """The floor is max(longest job, sum / cpus) over ``<key>.json`` entries; run records
    (``<key>.mlflow.json``) are not jobs."""
    from stages.jobs.cache import write_cached
    from stages.jobs.result import JobResult

    floor = _load("bench_startup").compute_floor
    for key, wall in (("a", 10.0), ("b", 4.0), ("c", 2.0)):  # entries as the job cache writes them
        write_cached(tmp_path, key, JobResult({"job_wall_s": wall}))
    (tmp_path / "a.mlflow.json").write_text(json.dumps({"run_id": "r"}))
    assert floor(tmp_path, 2) == {"jobs": 3, "job_sum": 16.0, "longest": 10.0, "floor": 10.0}
    assert floor(tmp_path, 1)["floor"] == 16.0
    assert floor(tmp_path / "missing", 2) == {"jobs": 0, "job_sum": 0, "longest": 0.0, "floor": 0.0}


def test_bench_multitask_tiny(tmp_path):
    out = tmp_path / "multitask.json"
    argv = ["--models", "test_vit", "--image-size", "32", "--tasks", "1,3,8", "--time-tasks", "1,3", "--batch", "4",
            "--repeats", "1", "--peft-max", "3", *ONE_THREAD, "--json-out", str(out)]
    _load("bench_multitask").main(argv)
    results = json.loads(out.read_text())
    assert {"date", "load_avg_1_5_15", "threads"} <= set(results["environment"])
    rows = {r["T"]: r for r in results["rows"]}
    assert set(rows) == {1, 3, 8} and "seconds" not in rows[8]  # T=8: memory only
    assert set(rows[3]["seconds"]) == {"single", "mixed", "shared", "grouped", "batched", "loop", "task_by_task", "peft"}
    assert rows[3]["distinct_per_batch"] == 3 and set(rows[3]["picks"]) <= {"batched", "grouped", "shared"} and rows[3]["picks"]
    assert rows[3]["fastest_forced"] in ("shared", "grouped", "batched", "loop") and rows[3]["auto_vs_fastest"] > 0
    assert rows[1]["picks"] == []  # one task: the ordinary forward
    for r in rows.values():
        m = r["memory"]
        assert m["payload_bytes"] > 0 and m["tensor_bytes"] == m["bound_bytes"]  # nothing but T payloads added
        assert m["plain_models_bytes"] == r["T"] * m["plain_model_bytes"]


def test_bench_concurrency_tiny(tmp_path):
    out = tmp_path / "concurrency.json"
    result = _load("bench_concurrency").main(["--model", "test_vit", "--image", "32", "--calls", "8", "--threads", "4",
                                               "--json-out", str(out)])
    assert json.loads(out.read_text())["wrong_calls"] == 0 == result["wrong_calls"]
    assert result["one_thread"]["calls_per_s"] > 0 and result["concurrent"]["rows_per_s"] > 0


def test_bench_zoo_checks_and_resumes(tmp_path):
    out = tmp_path / "zoo.jsonl"
    summary = _load("bench_zoo").main(["--filter", "test_convnext*", "--out", str(out)])
    assert summary["models"] >= 2 and summary["counts"].get("exact") == summary["models"], summary
    lines = len(out.read_text().splitlines())
    _load("bench_zoo").main(["--filter", "test_convnext*", "--out", str(out)])  # resumes: nothing rerun
    assert len(out.read_text().splitlines()) == lines
