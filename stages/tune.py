"""Stage ``tune``: per architecture x method x task x seed, train one task's model as a Ray task.

Methods come from ``tune.methods`` (head-only, RECAST-FT, LoRA at a tiny budget, full
fine-tuning, ...); sequential continual-learning baselines from ``tune.continual`` (one Ray task
per architecture x method, trained task after task). The ``combine`` stage reuses this module
with its own method list (adapters alone and + RECAST). Every finished job writes one payload
(safetensors + JSON) and becomes an MLflow child run whose payload is registered.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from stages.common import ParamsError, Section, resolve, stage_params, validate_section, write_json_atomic


class MethodParams(Section):
    """One method row (see recast.recipes.MethodSpec)."""

    kind: Literal["head_only", "full", "recast", "adapter"]
    adapter: str | None = None
    recast: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict)
    lr: float | None = Field(None, gt=0)
    archs: list[str] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "adapter":
            if not self.adapter:
                raise ValueError("kind 'adapter' needs 'adapter: <preset>'")
            from recast.adapters import adapter_preset

            try:
                adapter_preset(self.adapter, **self.overrides)
            except (ValueError, TypeError) as err:
                raise ValueError(str(err)) from None
        return self


class TrainParams(Section):
    """Per-task training recipe (paper: 100 epochs, AdamW 2e-3, wd 1e-6, StepLR 33/0.1, clip 1)."""

    epochs: int = Field(100, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    step_size: int = Field(33, ge=1)
    gamma: float = Field(0.1, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=1)
    image_size: int = Field(32, ge=8)
    limit_train: int | None = Field(None, ge=1)
    limit_eval: int | None = Field(None, ge=1)


class ContinualParams(Section):
    """Sequential continual-learning baselines (recast.baselines): methods per architecture."""

    methods: dict[str, list[str]] = Field(default_factory=dict)
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class TuneParams(Section):
    archs: list[str]
    tasks: list[str] | None = None
    seeds: list[int] = Field(default_factory=lambda: [42])
    methods: dict[str, MethodParams]
    train: TrainParams = TrainParams()
    continual: ContinualParams = ContinualParams()
    data_dir: str = "data/prepared/offline"
    pretrain_dir: str = "outputs/pretrain"
    mimic_dir: str = "outputs/mimic"
    out_dir: str = "outputs/tune"


class CombineParams(Section):
    methods: dict[str, MethodParams]
    out_dir: str = "outputs/combine"


# ----------------------------------------------------------------------------- jobs
def task_names(p: TuneParams) -> list[str]:
    """The tasks to run: ``tune.tasks`` or every prepared task (except the source set)."""
    root = resolve(p.data_dir)
    suite = root / "suite.json"
    available = sorted(json.loads(suite.read_text())["tasks"]) if suite.exists() else []
    if p.tasks is None:
        if not available:
            raise ParamsError(f"tune.data_dir: no prepared tasks under {root}; run the prepare stage")
        return available
    unknown = [t for t in p.tasks if t not in available]
    if unknown and available:
        raise ParamsError(f"tune.tasks: unknown task(s) {unknown}; prepared: {available}")
    return list(p.tasks)


def tune_job(spec: dict) -> tuple[dict, dict]:
    """Ray task: train one method on one task; returns (metrics, payload tensors)."""
    from recast.data import BatchLoader, read_manifest
    from recast.recipes import MethodSpec, build_method
    from recast.training import TuneConfig, evaluate, fit
    from stages.backbones import load_backbone
    from stages.common import seed_everything

    seed_everything(spec["seed"])
    tr = TrainParams(**spec["train"])
    m = MethodParams(**spec["method"])
    task_dir = Path(spec["task_dir"])
    manifest = read_manifest(task_dir)
    needs_recast = m.kind == "recast" or m.recast
    bb = load_backbone(spec["arch"], Path(spec["pretrain_dir"]), Path(spec["mimic_dir"]) if needs_recast else None)
    built = build_method(MethodSpec(m.kind, m.adapter, m.recast, m.overrides, m.lr), bb, spec["task"], manifest.num_classes)
    loader = lambda split, train, limit: BatchLoader(task_dir, split, tr.batch_size, tr.image_size, train=train,
                                                     seed=spec["seed"], limit=limit)
    cfg = TuneConfig(epochs=tr.epochs, lr=m.lr or tr.lr, weight_decay=tr.weight_decay, step_size=tr.step_size,
                     gamma=tr.gamma, grad_clip=tr.grad_clip, device=spec["device"], progress=False)
    res = fit(built.model, built.trainable, loader("train", True, tr.limit_train), loader("val", False, tr.limit_eval),
              cfg, desc=spec["id"])
    test_acc = evaluate(built.model, loader("test", False, tr.limit_eval), cfg.device)
    payload = built.payload()
    meta = {
        "arch": spec["arch"], "method": spec["method_name"], "task": spec["task"], "seed": spec["seed"],
        "val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch,
        "trainable_params": int(sum(p.numel() for p in built.trainable)),
        "stored_params": int(sum(t.numel() for t in payload.values())),
        "bytes": int(sum(t.numel() * t.element_size() for t in payload.values())),
        "seconds_per_step": res.seconds_per_step, "train_seconds": res.seconds, "steps": res.steps,
        "num_classes": manifest.num_classes, "recast": needs_recast,
    }
    return meta, payload


def continual_job(spec: dict) -> tuple[dict, dict]:
    """Ray task: one sequential continual-learning baseline over all tasks of one arch."""
    from recast.baselines import TaskSpec, TrainConfig, make_method, run_sequential
    from recast.data import BatchLoader, read_manifest
    from stages.backbones import load_backbone
    from stages.common import seed_everything

    seed_everything(spec["seed"])
    tr = TrainParams(**spec["train"])
    bb = load_backbone(spec["arch"], Path(spec["pretrain_dir"]))
    backbone = bb.plain()
    backbone.reset_classifier(0)
    tasks = []
    for name in spec["task_order"]:
        tdir = spec["task_dirs"][name]
        tdir = Path(tdir)
        mk = lambda split, train, limit, tdir=tdir: BatchLoader(tdir, split, tr.batch_size, tr.image_size, train=train,
                                                                seed=spec["seed"], limit=limit)
        tasks.append(TaskSpec(name, read_manifest(tdir).num_classes, mk("train", True, tr.limit_train),
                              mk("val", False, tr.limit_eval), mk("test", False, tr.limit_eval)))
    cfg = TrainConfig(epochs=spec["epochs"], lr=spec["lr"], seed=spec["seed"], device=spec["device"],
                      grad_clip=tr.grad_clip)
    method = make_method(spec["method_name"], backbone, spec.get("options") or None)
    out = run_sequential(method, tasks, cfg, progress=False).to_json()
    return {**out, "arch": spec["arch"], "method": spec["method_name"], "seed": spec["seed"], "sequential": True}, {}


def build_specs(stage: str, p: TuneParams, methods: dict[str, MethodParams], device: str,
                continual: bool) -> list[dict]:
    """All jobs of the stage, with everything a Ray task needs (absolute paths)."""
    from stages.backbones import pretrained_meta

    tasks = task_names(p)
    data = resolve(p.data_dir)
    common = {"train": p.train.model_dump(), "pretrain_dir": str(resolve(p.pretrain_dir)),
              "mimic_dir": str(resolve(p.mimic_dir)), "device": device}
    specs = []
    for arch in p.archs:
        bb_sha = pretrained_meta(resolve(p.pretrain_dir), arch).get("sha256", "")
        mimic_json = resolve(p.mimic_dir) / arch / "recast.json"
        bank_sha = __import__("json").loads(mimic_json.read_text())["bank_sha256"] if mimic_json.exists() else ""
        for name, m in methods.items():
            if m.archs is not None and arch not in m.archs:
                continue
            if (m.kind == "recast" or m.recast) and not bank_sha:
                raise ParamsError(f"{stage}.methods.{name}: needs the mimic stage output {mimic_json}")
            for task in tasks:
                for seed in p.seeds:
                    specs.append({"id": f"{stage}/{arch}/{name}/{task}/s{seed}", "arch": arch, "method_name": name,
                                  "method": m.model_dump(), "task": task, "seed": seed,
                                  "task_dir": str(data / task), "backbone_sha": bb_sha, "bank_sha": bank_sha,
                                  "task_sha": _manifest_sha(data / task), **common})
        if continual:
            c = p.continual
            for name in c.methods.get(arch, []):
                for seed in p.seeds:
                    specs.append({"id": f"{stage}/{arch}/{name}/sequential/s{seed}", "kind": "continual", "arch": arch,
                                  "method_name": name, "seed": seed, "epochs": c.epochs, "lr": c.lr,
                                  "options": c.options.get(name, {}), "backbone_sha": bb_sha,
                                  "task_dirs": {t: str(data / t) for t in tasks}, "task_order": list(tasks),
                                  "task_sha": {t: _manifest_sha(data / t) for t in tasks}, **common})
    return specs


def _manifest_sha(task_dir: Path) -> str:
    import hashlib

    path = task_dir / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else ""


def dispatch(spec: dict) -> tuple[dict, dict]:
    """Ray entry point: a per-task job or a sequential baseline."""
    return continual_job(spec) if spec.get("kind") == "continual" else tune_job(spec)


def summarise(results: list[dict]) -> dict[str, Any]:
    """Per arch/method: mean test accuracy over tasks (seeds averaged), params and bytes per task."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        if r.get("sequential"):
            continue
        groups.setdefault(f"{r['arch']}/{r['method']}", {}).setdefault(r["task"], []).append(r)
    out: dict[str, Any] = {}
    for key, per_task in sorted(groups.items()):
        accs = {t: statistics.mean(x["test_acc"] for x in rs) for t, rs in sorted(per_task.items())}
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


def run(stage: str, p: TuneParams, methods: dict[str, MethodParams], rt, out_dir: str,
        continual: bool) -> dict[str, Any]:
    """Run the stage's jobs; write payloads, ``<out_dir>/results.json`` and ``metrics/<stage>.json``."""
    from recast.io import save_tensors, tensors_sha256
    from stages.fanout import run_jobs
    from stages.runtime import pick_device
    from stages.tracking import Tracker, register_payload

    specs = build_specs(stage, p, methods, pick_device(rt.device), continual)
    tracker = Tracker(stage, rt.experiment, {"methods": {k: v.model_dump() for k, v in methods.items()},
                                             "train": p.train.model_dump(), "archs": p.archs, "seeds": p.seeds})
    out = resolve(out_dir)
    rows: list[dict] = []

    def on_result(spec, result, cached):
        meta, tensors = result
        meta = {k: v for k, v in meta.items() if not k.startswith("_")}
        rows.append(meta)
        artifacts = []
        if tensors:
            rel = Path(spec["arch"]) / spec["method_name"] / f"{spec['task']}-s{spec['seed']}"
            side = {"kind": "recast-payload" if meta.get("recast") else "payload", "version": 1,
                    "task": spec["task"], "arch": spec["arch"], "method": spec["method_name"],
                    "num_classes": meta.get("num_classes"), "bank_sha256": spec.get("bank_sha") if meta.get("recast") else None,
                    "payload_sha256": tensors_sha256(tensors), "numel": meta["stored_params"], "bytes": meta["bytes"],
                    "metrics": {k: meta[k] for k in ("val_acc", "test_acc")}}
            st = save_tensors(tensors, side, out / "payloads" / rel)
            artifacts = [st, st.with_suffix(".json")]
        params = {k: spec[k] for k in ("arch", "method_name", "seed") if k in spec}
        params.update({"task": spec.get("task", "sequential"), "method": spec.get("method", spec.get("options"))})
        metrics = {k: v for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rid = tracker.child(spec["id"], params, metrics, artifacts, tags={"cached": str(cached)})
        if tensors and not cached:
            register_payload(rid, spec["arch"], spec["task"], spec["method_name"],
                             {"test_acc": f"{meta['test_acc']:.6f}", "bank_sha256": str(spec.get("bank_sha")),
                              "seed": str(spec["seed"]), "bytes": str(meta["bytes"])}, accuracy=meta["test_acc"])

    run_jobs(stage, dispatch, specs, rt, on_result)
    rows.sort(key=lambda r: (r["arch"], r["method"], r.get("task", ""), r["seed"]))
    write_json_atomic(out / "results.json", rows)
    summary = summarise(rows)
    write_json_atomic(resolve(f"metrics/{stage}.json"), summary)
    tracker.finish({f"{k.replace('/', '.')}.avg_test_acc": v["avg_test_acc"] for k, v in summary.items()
                    if "avg_test_acc" in v})
    return summary


def main(argv: list[str] | None = None) -> None:
    from stages.runtime import RuntimeParams

    data = stage_params(argv, __doc__)
    p = validate_section("tune", TuneParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    summary = run("tune", p, p.methods, rt, p.out_dir, continual=True)
    for k, v in summary.items():
        print(f"{k:40s} avg test acc {v.get('avg_test_acc', float('nan')):.4f}")


if __name__ == "__main__":
    # Run from the importable module, not __main__, so Ray pickles job functions by reference.
    from stages.tune import main as _main

    _main()
