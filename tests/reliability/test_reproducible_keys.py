"""Identical inputs give identical bytes and identical cache keys: payload files are
byte-reproducible, and a copied or moved project reuses every cached job (keys hash content
digests, not paths)."""

from __future__ import annotations

import hashlib
import shutil

import torch
from faults import write_stage_files

from recast.io import save_tensors
from stages.config.common import resolve
from stages.config.params import MimicParams, PretrainParams, RuntimeParams, TuneParams
from stages.jobs import fanout
from stages.jobs.cache import spec_key, write_cached
from stages.jobs.inputs import InputStore
from stages.jobs.mimicry import build_specs as mimic_specs
from stages.jobs.pretraining import build_specs as pretrain_specs
from stages.jobs.result import JobResult
from stages.jobs.specs import method_specs


def test_payload_bytes_are_reproducible(tmp_path):
    tensors = {"coef": torch.arange(6, dtype=torch.float32).reshape(2, 3), "head.bias": torch.ones(5)}
    digests = set()
    for i in range(8):  # the safetensors header used to list its metadata in hash order
        st = save_tensors(tensors, {"task": "t", "b": 1, "a": 2}, tmp_path / f"p{i}")
        digests.add(hashlib.sha256(st.read_bytes()).hexdigest())
        digests.add(hashlib.sha256(st.with_suffix(".json").read_bytes()).hexdigest())
    assert len(digests) == 2  # one tensor file, one sidecar
    assert not list(tmp_path.glob("*.tmp"))


def _all_specs(monkeypatch, root):
    """Every job spec of pretrain, mimic and tune for the project at ``root``."""
    monkeypatch.setattr("stages.config.common.REPO_ROOT", root)
    tune = TuneParams(archs=["vit"], tasks=["task_a", "task_b"], seeds=[42],
                      methods={"recast": {"kind": "recast"}, "head_only": {"kind": "head_only"}})
    pre = PretrainParams(archs={"vit": {"model": "test_vit"}})
    mim = MimicParams(archs={"vit": {"preset": "recast_att_mlp", "overrides": {"groups": 3}}})
    store = InputStore(None)
    return (method_specs("tune", tune, tune.methods, "cpu", store) + pretrain_specs(pre, "cpu", store)
            + mimic_specs(mim, "cpu", store))


def test_moved_project_reuses_every_cached_job(tmp_path, monkeypatch):
    a = write_stage_files(tmp_path / "a")
    specs_a = _all_specs(monkeypatch, a)
    assert len(specs_a) == 4 + 1 + 1 and not any(str(a) in str(s) for s in specs_a)  # inputs named by digest
    rt = RuntimeParams(progress=False)  # cache_dir relative: it moves with the project
    for s in specs_a:
        write_cached(resolve(rt.cache_dir) / s["id"].split("/")[0], spec_key(s), JobResult({"id": s["id"]}))
    b = tmp_path / "moved" / "b"
    shutil.copytree(a, b)
    shutil.rmtree(a)
    specs_b = _all_specs(monkeypatch, b)
    assert sorted(map(spec_key, specs_a)) == sorted(map(spec_key, specs_b))

    def no_ray(rt):
        raise AssertionError("a moved project recomputed a cached job")

    monkeypatch.setattr(fanout, "init_ray", no_ray)
    seen = []
    for stage in ("tune", "pretrain", "mimic"):
        fanout.run_jobs(stage, None, [s for s in specs_b if s["id"].startswith(stage)], rt,
                        lambda s, r, cached: seen.append(cached))
    assert seen == [True] * len(specs_b)


def test_cache_key_follows_content_not_location(tmp_path, monkeypatch):
    """Changing a task's data (its manifest) changes only that task's keys."""
    root = write_stage_files(tmp_path / "p")
    before = {s["id"]: spec_key(s) for s in _all_specs(monkeypatch, root)}
    manifest = root / "data/prepared/offline/task_b/manifest.json"
    manifest.write_text(manifest.read_text().replace('"num_classes": 5', '"num_classes": 6'))
    after = {s["id"]: spec_key(s) for s in _all_specs(monkeypatch, root)}
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["tune/vit/head_only/task_b/s42", "tune/vit/recast/task_b/s42"]
