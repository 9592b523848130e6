"""What the tune and combine stages do with a finished job: write its payload, log it to
MLflow as a child run, register the payload, and summarise all jobs per arch/method."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from recast.io import save_tensors, tensors_sha256
from stages.common import determinism_tags
from stages.lineage import StageLineage, TaskData
from stages.runlog import acc_matrix_history, log_datasets, log_history, log_json
from stages.tracking import Tracker, register_payload

JOB_SPEC_ARTIFACT = "job/spec.json"  # the job spec on its child run: what `stages.registry reproduce` re-runs


def job_tasks(spec: dict) -> list[TaskData]:
    """The prepared tasks a job reads: its task, or every task of a sequential baseline."""
    if "task_dirs" in spec:
        return [TaskData.of(t, spec["task_dirs"][t]) for t in spec["task_order"]]
    return [TaskData.of(spec["task"], spec["task_dir"])]


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


class Publisher:
    """Collects the rows of a stage and publishes each finished job (``run_jobs``'s ``on_result``).

    With ``lineage``, each child run gets the stage's lineage tags, its tasks as dataset inputs,
    its job spec as the artifact ``job/spec.json`` (``stages.registry reproduce`` re-runs it) and
    its curves; each row gets the lineage columns, the run id and the data/backbone/bank digests.
    """

    def __init__(self, tracker: Tracker, out_dir: Path, lineage: StageLineage | None = None):
        self.tracker, self.out_dir, self.lineage, self.rows = tracker, out_dir, lineage, []
        self.histories: dict[str, list[dict]] = {}

    def __call__(self, spec: dict, result: tuple[dict, dict[str, torch.Tensor]], cached: bool) -> None:
        meta, tensors = result
        history, nondeterministic = meta.get("_history", []), meta.get("_nondeterministic", [])
        meta = {k: v for k, v in meta.items() if not k.startswith("_")}
        artifacts = []
        payload_sha = ""
        if tensors:
            payload_sha = tensors_sha256(tensors)
            side = {**payload_sidecar(spec, meta), "payload_sha256": payload_sha}
            st = save_tensors(tensors, side, payload_path(self.out_dir, spec))
            artifacts = [st, st.with_suffix(".json")]
        params = {k: spec[k] for k in ("arch", "method_name", "seed") if k in spec}
        params.update({"task": spec.get("task", "sequential"), "method": spec.get("method", spec.get("options"))})
        metrics = {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tasks = job_tasks(spec)
        tags = {"cached": str(cached), **determinism_tags({"_nondeterministic": nondeterministic})}
        if self.lineage is not None:
            tags.update(self.lineage.tags())
        tags.update({"backbone_sha256": str(spec.get("backbone_sha", "")), "bank_sha256": str(spec.get("bank_sha", ""))})
        rid = self.tracker.child(spec["id"], params, metrics, artifacts, tags=tags)
        log_datasets(self.tracker, rid, tasks)
        log_json(self.tracker, rid, {"spec": spec, "torch_threads": meta.get("torch_threads")}, JOB_SPEC_ARTIFACT)
        if history:
            log_history(self.tracker, rid, history, "epoch", "epoch")
            self.histories[spec["id"]] = history
        if meta.get("sequential") and meta.get("acc_matrix"):
            log_history(self.tracker, rid, acc_matrix_history(meta["task_names"], meta["acc_matrix"]),
                        "task_index", "acc_matrix")
        lineage = {"run_id": rid, **(self.lineage.columns() if self.lineage is not None else {}),
                   "backbone_sha256": str(spec.get("backbone_sha", "")), "bank_sha256": str(spec.get("bank_sha", "")),
                   "data_sha256": ",".join(t.sha256 for t in tasks), "payload_sha256": payload_sha}
        self.rows.append({**meta, **lineage})
        if tensors and not cached:
            version_tags = {"test_acc": f"{meta['test_acc']:.6f}", "seed": str(spec["seed"]), "bytes": str(meta["bytes"]),
                            "run_id": rid, "git.commit": lineage.get("git_commit", ""),
                            "git.dirty": lineage.get("git_dirty", ""), "data.task": spec["task"],
                            "data.sha256": lineage["data_sha256"], "backbone_sha256": lineage["backbone_sha256"],
                            "bank_sha256": str(spec.get("bank_sha")), "payload_sha256": payload_sha,
                            "params_sha256": lineage.get("params_sha256", ""), "deps_sha256": lineage.get("deps_sha256", "")}
            register_payload(rid, spec["arch"], spec["task"], spec["method_name"], version_tags,
                             accuracy=meta["test_acc"])

    def sorted_rows(self, task_order: list[str]) -> list[dict]:
        """Rows by arch, method, task (in the configured order), seed."""
        pos = {t: i for i, t in enumerate(task_order)}
        return sorted(self.rows, key=lambda r: (r["arch"], r["method"], pos.get(r.get("task", ""), -1), r["seed"]))


def summarise(results: list[dict]) -> dict[str, Any]:
    """Per arch/method: mean test accuracy over tasks (seeds averaged), params and bytes per task."""
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
                    "stored_params": statistics.mean(x["stored_params"] for x in rows),
                    "bytes": statistics.mean(x["bytes"] for x in rows),
                    "seconds_per_step": statistics.mean(x["seconds_per_step"] for x in rows),
                    "train_seconds": sum(x["train_seconds"] for x in rows)}
    for r in results:
        if r.get("sequential"):
            key = f"{r['arch']}/{r['method']}"
            out[key] = {k: r[k] for k in ("avg_forgetting", "forgetting", "acc_matrix", "task_names") if k in r}
            out[key].update(avg_test_acc=r["avg_acc"], test_acc=dict(zip(r["task_names"], r["final_acc"])),
                            trainable_params=statistics.mean(r["trainable_params"]),
                            bytes=statistics.mean(r["bytes_per_task"]) if isinstance(r["bytes_per_task"], list)
                            else r["bytes_per_task"], train_seconds=sum(r["wall_time_s"]), sequential=True)
    return out
