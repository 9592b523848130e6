"""The payload-loading check of the evaluate stage: every task's RECAST payload loaded, in task
order, into ONE RecastModel on the shared banks, every earlier task re-evaluated after each
addition (task identity is known, so this must stay exactly unchanged), all loaded tasks in
mixed-task batches (``recast.training.evaluate_mixed``: one ``rc(x, tasks=...)`` forward per batch). One Ray job per
architecture (``stages.jobs.fanout.run_jobs``), on ``runtime.device``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from recast.io import load_payload
from recast.training import evaluate_mixed
from stages.config.common import IntegrityError, resolve
from stages.config.params import RuntimeParams, TuneParams
from stages.jobs.backbones import bank_meta, load_verified, read_sidecar
from stages.jobs.fanout import run_jobs
from stages.jobs.inputs import InputStore, JobInputs, backbone_bundle, banks_bundle, file_bundle, task_bundle
from stages.jobs.result import JobResult
from stages.jobs.runtime import job_device
from stages.jobs.specs import task_names


def reload_spec(arch: str, tune_dir: Path, results: list[dict], p_tune: TuneParams, device: str,
                store: InputStore, method: str = "recast") -> dict[str, Any] | None:
    """The job spec of ``reload_job`` for ``arch`` (None when it has no ``method`` payloads); the
    payloads, tasks, backbone and banks are added to ``store``."""
    order = {t: i for i, t in enumerate(task_names(p_tune))}
    seed = p_tune.seeds[0]
    rows = sorted((r for r in results if r["arch"] == arch and r["method"] == method and r["seed"] == seed
                   and not r.get("sequential")), key=lambda r: order.get(r["task"], len(order)))
    if not rows:
        return None
    data = resolve(p_tune.data_dir)
    roles = {"backbone": store.add(backbone_bundle(resolve(p_tune.pretrain_dir), arch)),
             "banks": store.add(banks_bundle(resolve(p_tune.mimic_dir), arch))}
    banks_sha = bank_meta(resolve(p_tune.mimic_dir), arch)["bank_sha256"]
    for r in rows:
        stem = tune_dir / "payloads" / arch / method / f"{r['task']}-s{seed}"
        side = read_sidecar(stem.with_suffix(".json"))  # checked here, before any job: fail fast, name the file
        if side.get("bank_sha256") != banks_sha:
            raise IntegrityError(f"{stem}.safetensors: payload trained against banks {str(side.get('bank_sha256'))[:12]}, "
                                 f"the mimic stage's banks are {banks_sha[:12]}; re-run the tune stage")
        load_verified(stem.with_suffix(".safetensors"), side.get("payload_sha256"))
        roles[f"payload/{r['task']}"] = store.add(file_bundle(stem.with_suffix(".safetensors")))
        roles[f"sidecar/{r['task']}"] = store.add(file_bundle(stem.with_suffix(".json")))
        roles[f"task/{r['task']}"] = store.add(task_bundle(data / r["task"]))
    return {"id": f"reload/{arch}/{method}", "arch": arch, "device": device, "tasks": [r["task"] for r in rows],
            "standalone": [r["test_acc"] for r in rows], "image_size": p_tune.train_for(arch).image_size,
            "limit_eval": p_tune.train_for(arch).limit_eval, "inputs": roles}


def reload_job(spec: dict, inputs: JobInputs) -> JobResult:
    """Ray task, the payload-loading check: load every task's RECAST payload (sha256 checked by
    ``recast.load_payload``), in task order, into ONE model on the shared banks and re-evaluate
    every earlier task after each addition, in mixed-task batches; the last row must equal the standalone accuracies.
    (Forgetting itself is measured by training in sequence: the tune stage's ``recast``
    continual job.)"""
    device = spec["device"]
    rc = inputs.backbone("backbone", banks="banks").recast().to(device)
    tasks = spec["tasks"]
    matrix: list[list[float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, task in enumerate(tasks):
            for role, suffix in (("payload", ".safetensors"), ("sidecar", ".json")):
                (Path(tmp) / f"{task}{suffix}").write_bytes(inputs.file(f"{role}/{task}")[1])
            load_payload(rc, Path(tmp) / task, task=task)
            loaders = {prev: inputs.task(f"task/{prev}").loader(
                "test", 256, spec["image_size"], train=False, seed=0, limit=spec["limit_eval"], device=device)
                for prev in tasks[:i + 1]}
            acc = evaluate_mixed(rc, loaders, device, spec.get("precision", "fp32"))  # tasks 0..i mixed, one forward each
            row: list[float | None] = [acc[prev] for prev in tasks[:i + 1]] + [None] * (len(tasks) - i - 1)
            matrix.append(row)
    final = matrix[-1]
    return JobResult({"tasks": tasks, "acc_matrix": matrix, "device": device,
                      "max_abs_diff_vs_standalone": max(abs(a - b) for a, b in zip(final, spec["standalone"]))})


def payload_reload(archs: list[str], tune_dir: Path, results: list[dict], p_tune: TuneParams,
                   rt: RuntimeParams, method: str = "recast") -> dict[str, dict[str, Any]]:
    """``reload_job`` for each arch with payloads, as Ray jobs (``stages.jobs.fanout.run_jobs``)."""
    device = job_device(rt)
    store = InputStore(rt.storage)
    specs = [s for arch in archs if (s := reload_spec(arch, tune_dir, results, p_tune, device, store, method))]
    if rt.precision != "fp32":  # the standalone accuracies were measured in it
        specs = [{**s, "precision": rt.precision} for s in specs]
    done = run_jobs("reload", reload_job, specs, rt, inputs=store)
    return {s["arch"]: done[s["id"]].metrics for s in specs}
