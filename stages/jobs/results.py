"""What the tune and combine stages do with a finished job: write its payload, log it to
MLflow as a child run, register the payload, and summarise all jobs per arch/method.

A job from the cache is published the same way: its child run is found again by its cache key
and its payload registered unless its run has a version already, so a resumed stage catches up
on what an interrupted one did not log."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recast.io import tensors_sha256
from stages.config.common import resolve
from stages.jobs.backbones import pretrained_meta
from stages.jobs.cache import job_file, spec_key, store_tensors
from stages.jobs.driver import StageRun
from stages.jobs.inputs import InputStore
from stages.jobs.result import JobResult
from stages.report.tables import SEQUENTIAL_SUFFIX
from stages.tracking.lineage import TaskData
from stages.tracking.payloads import register_payload
from stages.tracking.runlog import acc_matrix_history, log_datasets, log_history, log_json

LR_SOURCE_TAG = "lr.source"  # e.g. hpo:<sweep key>, params:tune.train.lr
JOB_SPEC_ARTIFACT = "job/spec.json"  # the job spec on its child run: what `stages.registry reproduce` re-runs


def input_sources(spec: dict, store: InputStore) -> dict[str, str]:
    """Role -> the absolute folder on the driver that role's bundle was read from (the task
    folder; the pretrain dir of a backbone; the mimic dir of banks): ``stages.registry reproduce``
    rebuilds the same bundles from there."""
    out = {}
    for role, key in spec.get("inputs", {}).items():
        b = store.bundles[key]
        first = {"task": "manifest.json", "backbone": "meta.json", "banks": "recast.json"}.get(b.kind)
        if first is None:
            continue
        folder = b.files[first].parent.resolve()
        folder = folder.parent if b.kind == "banks" else folder  # <mimic_dir>/<arch>/recast.json
        out[role] = str(folder)
    return out


def job_tasks(spec: dict, sources: dict[str, str]) -> list[TaskData]:
    """The prepared tasks a job reads: its task, or every task of a sequential baseline."""
    if "task_order" in spec:
        return [TaskData.of(t, resolve(sources[f"task/{t}"])) for t in spec["task_order"]]
    return [TaskData.of(spec["task"], resolve(sources["task"]))] if "task" in sources else []


def backbone_sha(sources: dict[str, str], arch: str) -> str:
    """The sha256 of the backbone state a job read (from its pretrain sidecar)."""
    return str(pretrained_meta(resolve(sources["backbone"]), arch).get("sha256", "")) if "backbone" in sources else ""


def payload_sidecar(spec: dict, meta: dict) -> dict[str, Any]:
    """JSON sidecar of a task payload written by the pipeline."""
    return {"kind": "recast-payload" if meta.get("recast") else "payload", "version": 1,
            "task": spec["task"], "arch": spec["arch"], "method": spec["method_name"],
            "num_classes": meta.get("num_classes"), "bank_sha256": spec.get("bank_sha") if meta.get("recast") else None,
            "numel": meta["stored_params"], "bytes": meta["bytes"],
            "metrics": {k: meta[k] for k in ("val_acc", "test_acc")}}


def payload_path(out_dir: Path, spec: dict) -> Path:
    """``<out_dir>/payloads/<arch>/<method>/<task>-s<seed>`` (without suffix)."""
    return out_dir / "payloads" / spec["arch"] / spec["method_name"] / f"{spec['task']}-s{spec['seed']}"


def publish_job(run: StageRun, spec: dict, result: JobResult, cached: bool) -> dict[str, Any]:
    """Publish one finished job of a tune or combine stage (``FannedOutStage.publish``); its row.

    A payload file is a hard link to the job's cache entry (``stages.jobs.cache.store_tensors``), and
    it is logged to MLflow once: a cached job's child run points at the first run's artifacts.

    The child run gets the job's tasks as dataset inputs, its job spec and input folders as the
    artifact ``job/spec.json`` (``stages.registry reproduce`` re-runs it), its curves and the
    stage's lineage tags. The row gets the lineage columns, the run id and the
    data/backbone/bank digests.
    """
    meta, tensors = result.metrics, result.tensors
    artifacts = []
    payload_sha = ""
    if tensors:
        payload_sha = tensors_sha256(tensors)
        side = {**payload_sidecar(spec, meta), "payload_sha256": payload_sha}
        st = store_tensors(run.rt, run.stage, spec, tensors, side, payload_path(run.out_dir, spec))
        artifacts = [st, st.with_suffix(".json")]
    params = {k: spec[k] for k in ("arch", "method_name", "seed", "lr") if k in spec}
    params.update({"task": spec.get("task", "sequential"), "method": spec.get("method", spec.get("options"))})
    metrics = {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    sources = input_sources(spec, run.store)
    tasks = job_tasks(spec, sources)
    bb_sha = backbone_sha(sources, spec["arch"])
    tags = {"cached": str(cached), **result.determinism_tags(), **run.lineage_tags(),
            "backbone_sha256": bb_sha, "bank_sha256": str(spec.get("bank_sha", ""))}
    if "lr_source" in spec:  # where the job's learning rate comes from (TuneParams.lr_for)
        tags[LR_SOURCE_TAG] = spec["lr_source"]
    tracker = run.tracker
    rid = tracker.child(spec["id"], params, metrics, artifacts, tags=tags,
                        key=spec_key(spec), logged_at=job_file(run.rt, run.stage, spec, ".mlflow.json"))
    if rid is not None:  # None: the store is unreachable (the Tracker is offline)
        log_datasets(tracker, rid, tasks)
        log_json(tracker, rid, {"spec": spec, "sources": sources, "machine": result.machine,
                                "torch_threads": result.machine.get("torch_threads", meta.get("torch_threads"))},
                 JOB_SPEC_ARTIFACT)
        if result.history:
            log_history(tracker, rid, result.history, "epoch", "epoch")
        if meta.get("sequential") and meta.get("acc_matrix"):
            log_history(tracker, rid, acc_matrix_history(meta["task_names"], meta["acc_matrix"]),
                        "task_index", "acc_matrix")
    lineage = {"run_id": rid or "", **run.lineage_columns(),
               "backbone_sha256": bb_sha, "bank_sha256": str(spec.get("bank_sha", "")),
               "data_sha256": ",".join(t.sha256 for t in tasks), "payload_sha256": payload_sha}
    if tensors and rid is not None:
        version_tags = {"test_acc": f"{meta['test_acc']:.6f}", "seed": str(spec["seed"]), "bytes": str(meta["bytes"]),
                        "run_id": rid, "git.commit": lineage.get("git_commit", ""),
                        "git.dirty": lineage.get("git_dirty", ""), "data.task": spec["task"],
                        "data.sha256": lineage["data_sha256"], "backbone_sha256": lineage["backbone_sha256"],
                        "bank_sha256": str(spec.get("bank_sha")), "payload_sha256": payload_sha,
                        "params_sha256": lineage.get("params_sha256", ""),
                        "deps_sha256": lineage.get("deps_sha256", "")}
        tracker.guard(lambda: register_payload(rid, spec["arch"], spec["task"], spec["method_name"],
                                               version_tags, val_acc=meta["val_acc"]),
                      f"registration of {spec['id']}")
    return {**meta, **lineage}


def row_order(task_order: list[str]) -> Callable[[dict], tuple]:
    """The sort key of a tune/combine row: arch, method, task (in the configured order), seed."""
    pos = {t: i for i, t in enumerate(task_order)}
    return lambda r: (r["arch"], r["method"], pos.get(r.get("task", ""), -1), r["seed"])


def summarise(results: list[dict]) -> dict[str, Any]:
    """Per arch/method: mean test accuracy over tasks (seeds averaged), params and bytes per task;
    for a sequential method the same numbers of its end-of-stream accuracies, and its
    forgetting, each a mean over seeds."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        if r.get("sequential"):
            continue
        groups.setdefault(f"{r['arch']}/{r['method']}", {}).setdefault(r["task"], []).append(r)
    out: dict[str, Any] = {}
    for key, per_task in sorted(groups.items()):
        accs = {t: statistics.mean(x["test_acc"] for x in rs) for t, rs in per_task.items()}
        rows = [x for rs in per_task.values() for x in rs]
        out[key] = {"avg_test_acc": statistics.mean(accs.values()), "test_acc": accs,
                    "trainable_params": statistics.mean(x["trainable_params"] for x in rows),
                    "task_params": statistics.mean(x["task_params"] for x in rows),
                    "head_params": statistics.mean(x["head_params"] for x in rows),
                    "stored_params": statistics.mean(x["stored_params"] for x in rows),
                    "bytes": statistics.mean(x["bytes"] for x in rows),
                    "seconds_per_step": statistics.mean(x["seconds_per_step"] for x in rows),
                    "train_seconds": sum(x["train_seconds"] for x in rows)}
    sequential: dict[str, list[dict]] = {}
    for r in sorted((r for r in results if r.get("sequential")), key=lambda r: r["seed"]):
        key = f"{r['arch']}/{r['method']}"
        if key in groups:  # e.g. RECAST, which also runs per task: its protocol row gets its own name
            key += SEQUENTIAL_SUFFIX
        sequential.setdefault(key, []).append(r)
    for key, rs in sequential.items():  # every number a mean over the seeds, like the per-task rows
        first = rs[0]
        matrix = [[None if v is None else statistics.mean(r["acc_matrix"][i][j] for r in rs) for j, v in enumerate(row)]
                  for i, row in enumerate(first["acc_matrix"])]
        out[key] = {"avg_forgetting": statistics.mean(r["avg_forgetting"] for r in rs),
                    "forgetting": [None if None in f else statistics.mean(f) for f in zip(*(r["forgetting"] for r in rs))]
                    if all("forgetting" in r for r in rs) else first.get("forgetting"),
                    "acc_matrix": matrix, "task_names": first["task_names"], "seeds": len(rs),
                    "avg_test_acc": statistics.mean(r["avg_acc"] for r in rs),
                    "test_acc": {t: statistics.mean(r["final_acc"][i] for r in rs)
                                 for i, t in enumerate(first["task_names"])},
                    "trainable_params": statistics.mean(statistics.mean(r["trainable_params"]) for r in rs),
                    "bytes": statistics.mean(statistics.mean(r["bytes_per_task"]) if isinstance(r["bytes_per_task"], list)
                                             else r["bytes_per_task"] for r in rs),
                    "train_seconds": sum(sum(r["wall_time_s"]) for r in rs), "sequential": True}
    return out
