"""Every file the pipeline reads back is checked against a recorded digest: a flipped byte or a
truncated file in the job cache is discarded (with a warning) and the job computed again; in a
payload, the pretrained weights, the banks or the base coefficients it is a named IntegrityError
(which survives pickling), never a silently wrong number."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from faults import TASKS, flip_byte

from stages.config.common import IntegrityError
from stages.config.params import TuneParams
from stages.jobs import cache as cache_module
from stages.jobs import fanout
from stages.jobs.backbones import load_backbone
from stages.jobs.cache import spec_key
from stages.jobs.faults import FAULT_ENV
from stages.jobs.inputs import InputStore
from stages.jobs.reload import reload_spec
from stages.jobs.result import JobResult

RESULT = JobResult({"acc": 0.5440, "epochs": 3}, {"head": torch.arange(12, dtype=torch.float32).reshape(3, 4)},
                   history=[{"epoch": 1, "val_acc": 0.5}], nondeterministic=["an op"], machine={"torch_threads": 1})


def _cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache" / "tune"
    cache_module.write_cached(cache, "k1", RESULT)
    got = cache_module.read_cached(cache, "k1")
    assert got.metrics == RESULT.metrics and torch.equal(got.tensors["head"], RESULT.tensors["head"])  # reused
    assert (got.history, got.nondeterministic, got.machine) == ([{"epoch": 1, "val_acc": 0.5}], ["an op"],
                                                                {"torch_threads": 1})
    return cache


def _corrupt_json_value(path: Path) -> None:
    path.write_text(path.read_text().replace("0.544", "0.844"))  # still valid JSON, another accuracy


@pytest.mark.parametrize("fault", ["json value", "json byte", "tensor byte", "tensor header byte",
                                   "truncated tensors", "truncated json", "missing tensors"])
def test_bad_cache_entry_is_discarded_with_a_warning(tmp_path, fault):
    cache = _cache(tmp_path)
    js, st = cache / "k1.json", cache / "k1.safetensors"
    if fault == "json value":
        _corrupt_json_value(js)
    elif fault == "json byte":
        flip_byte(js, len(js.read_bytes()) // 2)
    elif fault == "tensor byte":
        flip_byte(st)
    elif fault == "tensor header byte":
        flip_byte(st, 12)
    elif fault == "truncated tensors":
        st.write_bytes(st.read_bytes()[:-7])
    elif fault == "truncated json":
        js.write_bytes(js.read_bytes()[:40])
    else:
        st.unlink()
    with pytest.warns(UserWarning, match="corrupt.*runs again"):
        assert cache_module.read_cached(cache, "k1") is None
    assert not js.exists() and not st.exists()  # discarded: the next write starts clean
    cache_module.write_cached(cache, "k1", RESULT)  # ... and the recomputed result is cached again
    assert cache_module.read_cached(cache, "k1").metrics == RESULT.metrics


def test_run_jobs_recomputes_a_corrupt_entry(tmp_path, monkeypatch):
    """run_jobs reuses the good entries and computes only the corrupt one again (in this process:
    one job left needs no Ray), then caches it afresh."""
    import ray

    from stages.config.params import RuntimeParams

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv(FAULT_ENV, raising=False)
    rt = RuntimeParams(cache_dir=str(tmp_path / "cache"), progress=False)
    specs = [{"id": f"j/{i}", "x": i} for i in range(3)]
    cache = tmp_path / "cache" / "j"
    for s in specs:
        result = JobResult({"y": s["x"] ** 2}, {"t": torch.full((2,), float(s["x"]))})
        cache_module.write_cached(cache, spec_key(s), result)
    flip_byte(cache / f"{spec_key(specs[1])}.safetensors")
    computed = []

    def job(spec, inputs):
        computed.append(spec["id"])
        return JobResult({"y": spec["x"] ** 2}, {"t": torch.full((2,), float(spec["x"]))})

    def no_ray(rt):
        raise AssertionError("one job left to compute: Ray must not start")

    monkeypatch.setattr(fanout, "init_ray", no_ray)
    seen = []
    with pytest.warns(UserWarning, match="corrupt"):
        fanout.run_jobs("j", job, specs, rt, lambda s, r, cached: seen.append((s["id"], cached, r.metrics["y"])))
    assert computed == ["j/1"]
    assert sorted(seen) == [("j/0", True, 0), ("j/1", False, 1), ("j/2", True, 4)]
    again = cache_module.read_cached(cache, spec_key(specs[1]))  # a good entry again
    assert again.metrics["y"] == 1 and torch.equal(again.tensors["t"], torch.full((2,), 1.0))


@pytest.mark.parametrize("name, flip_at", [("pretrain/vit.safetensors", -1), ("pretrain/vit.safetensors", 20),
                                           ("mimic/vit/banks.safetensors", -1), ("mimic/vit/base.safetensors", -1)])
def test_corrupt_backbone_files_are_named_errors(stage_files, name, flip_at):
    out = stage_files / "outputs"
    bb = load_backbone("vit", out / "pretrain", out / "mimic")  # clean files load
    assert bb.banks and bb.base
    flip_byte(out / name, flip_at)
    with pytest.raises(IntegrityError, match=Path(name).name.replace(".", r"\.")) as err:
        load_backbone("vit", out / "pretrain", out / "mimic")
    again = pickle.loads(pickle.dumps(err.value))  # crosses a Ray task boundary intact
    assert type(again) is IntegrityError and str(again) == str(err.value)


@pytest.mark.parametrize("flip_at", [-1, 20])
def test_corrupt_payload_fails_the_forgetting_check(stage_files, monkeypatch, flip_at):
    """evaluate's forgetting matrix loads payloads through their recorded sha256."""
    monkeypatch.setattr("stages.config.common.REPO_ROOT", stage_files)
    p_tune = TuneParams(archs=["vit"], tasks=list(TASKS), seeds=[42], methods={"recast": {"kind": "recast"}})
    rows = [{"arch": "vit", "method": "recast", "seed": 42, "task": t, "num_classes": 10, "test_acc": 0.5} for t in TASKS]
    payload = stage_files / "outputs/tune/payloads/vit/recast/task_a-s42.safetensors"
    flip_byte(payload, flip_at)
    with pytest.raises(IntegrityError, match="task_a-s42.safetensors"):
        reload_spec("vit", stage_files / "outputs/tune", rows, p_tune, "cpu", InputStore(None))


def test_payload_against_other_banks_fails_the_forgetting_check(stage_files, monkeypatch):
    monkeypatch.setattr("stages.config.common.REPO_ROOT", stage_files)
    side = stage_files / "outputs/tune/payloads/vit/recast/task_a-s42.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "bank_sha256": "0" * 64}))
    p_tune = TuneParams(archs=["vit"], tasks=list(TASKS), seeds=[42], methods={"recast": {"kind": "recast"}})
    rows = [{"arch": "vit", "method": "recast", "seed": 42, "task": t, "num_classes": 10, "test_acc": 0.5} for t in TASKS]
    with pytest.raises(IntegrityError, match="trained against banks 000000000000"):
        reload_spec("vit", stage_files / "outputs/tune", rows, p_tune, "cpu", InputStore(None))
