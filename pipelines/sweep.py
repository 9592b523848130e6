"""Sweep driver on Ray Tune: trials, MLflow runs, table and plots.

    python -m pipelines.sweep --sweep gn|k|targets|budget|order|seeds|hpo [--config FILE] [--num-cpus N]
                              [--no-asha]

Grid sweeps: one ``tune.Tuner`` whose param space is a ``tune.grid_search`` over the sweep's
points, tasks and seeds (the specs of ``pipelines.specs``). ``hpo``: one Tuner per method of a
pipeline config and seed, random search over the lr, each trial scored on every task of the
config (``pipelines.config.HpoSweep``), ASHA on the validation accuracy. Trials run
``pipelines.trials.run_trial`` with the resources of params.yaml's ``runtime`` section (overridden
by the sweep config's ``runtime``), report each epoch through ``tune.report`` and are retried
``runtime.max_retries`` times (``FailureConfig``); a retried ``tune``/``stage_tune``/``recast_sequence``
trial resumes from its last epoch (of its task), a ``continual`` one from its last task
(``pipelines.tune_checkpoints``: each epoch, or task, reported with its checkpoint through Tune's
own API). Inputs reach them through a
``stages.jobs.inputs.InputStore`` (Ray's object store, or ``runtime.storage``): the driver passes the
refs with ``tune.with_parameters``, each trial resolves its own with ``JobInputs.fetch``.

Experiments persist under ``runtime.storage`` (default ``<runtime.cache_dir>/tune``), one per sweep
and content (``<sweep>-<sweep key>``): a rerun restores it with ``Tuner.restore`` and runs only
unfinished or errored trials. Each finished trial writes its final result under
``<experiment>/done/`` before reporting it, so a trial that finished after Tune's last
experiment-state save is not recomputed either. MLflow: ``pipelines.tracking.TrialLogger``.
Outputs: ``<out_dir>/<sweep>/{results.parquet,results.md,summary.json,<sweep>.png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipelines.config import SWEEP_NAMES, HpoSweep, SweepBase, load_config, runtime_params
from pipelines.report import make_row, write_report
from pipelines.specs import build_specs, recast_variants
from pipelines.tracking import TrialLogger
from pipelines.trials import CHECKPOINTED_KINDS, SEQUENCE_CHECKPOINTED_KINDS, run_trial
from pipelines.tune_checkpoints import TuneSequenceCheckpoints, TuneTrialCheckpoints
from recast.atomic import write_atomic_fs
from recast.targets import build_plan
from stages.config.common import resolve
from stages.config.params import RuntimeParams
from stages.jobs.backbones import load_backbone
from stages.jobs.cache import code_fingerprint, spec_key
from stages.jobs.fanout import check_code, init_ray
from stages.jobs.faults import MARKER_ENV, maybe_fault
from stages.jobs.inputs import InputStore, JobInputs
from stages.jobs.runtime import job_device


def sweep_key(sweep: str, specs: list[dict]) -> str:
    """Identity of a sweep run: its name and the keys (content + code) of its trials."""
    keys = sorted(spec_key(s) for s in specs)
    return hashlib.sha256(json.dumps([sweep, keys]).encode()).hexdigest()[:16]


def preflight(specs: list[dict], cfg: SweepBase) -> None:
    """Fail in the driver, before any trial, on a RECAST variant that does not fit the backbone
    (e.g. G not dividing the depth), naming the variant."""
    variants = recast_variants(specs)
    if not variants:
        return
    model = load_backbone(cfg.arch, resolve(cfg.pretrain_dir)).plain()
    for v in variants:
        try:
            build_plan(model, v.recast_config())
        except ValueError as err:
            raise ValueError(f"{v.preset} with {v.overrides} does not fit arch '{cfg.arch}': {err}") from None


# ----------------------------------------------------------------------------- trial side
def point_of(spec: dict) -> str:
    """A spec's grid coordinates as one key: ``name|task|seed``."""
    return f"{spec['name']}|{spec['task']}|{spec['seed']}"


def trial_spec(specs: dict[str, dict], config: dict[str, Any]) -> dict:
    """The spec of one Tune trial: its grid point's spec, with the searched lr (``hpo``) in
    every job it runs and in its id (the trial key)."""
    spec = specs[f"{config['name']}|{config['task']}|{config['seed']}"]
    if "lr" not in config:
        return spec
    lr = float(config["lr"])
    out = {**spec, "id": f"{spec['id']}/lr{lr:.3g}", "point": {**spec.get("point", {}), "lr": lr}}
    if "jobs" in spec:  # stage_tasks: the tune stage's job of each task at this lr
        out["jobs"] = [{**j, "lr": lr, "lr_source": "hpo:trial"} for j in spec["jobs"]]
    else:  # a sequential baseline
        out["lr"], out["lr_source"] = lr, "hpo:trial"
    return out


def _done_path(done_dir: str, trial_key: str) -> str:
    return f"{done_dir}/{trial_key.replace('/', '_')}.json"


def read_done(done_dir: str, trial_key: str) -> dict | None:
    """The final result a trial wrote before (None if it never finished)."""
    fs, path = pafs.FileSystem.from_uri(_done_path(done_dir, trial_key))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode())


def write_done(done_dir: str, trial_key: str, result: dict) -> None:
    """Write a trial's final result (temp name, then move) under the experiment."""
    fs, path = pafs.FileSystem.from_uri(_done_path(done_dir, trial_key))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    write_atomic_fs(fs, path, json.dumps(result, sort_keys=True).encode())


def sweep_trial(config: dict[str, Any], specs: dict[str, dict], inputs: dict[str, Any], done_dir: str,
                threads: int, code: str) -> None:
    """Tune trainable: run one trial; report each epoch, then the final result (``final``).
    ``inputs``: ``{bundle key: ObjectRef or URI}`` of every trial (``InputStore.refs``); ``code``:
    the driver's ``code_fingerprint`` (a worker that imports other code fails, ``check_code``)."""
    check_code(code)
    spec = trial_spec(specs, config)
    done = read_done(done_dir, spec["id"])
    if done is not None:  # finished before the driver's last experiment-state save: report, don't recompute
        tune.report(done)
        return
    torch.set_num_threads(threads)
    maybe_fault(spec["id"])
    if os.environ.get(MARKER_ENV):
        marker = Path(os.environ[MARKER_ENV]) / f"{spec['id'].replace('/', '_')}.{uuid.uuid4().hex}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{os.getpid()}\n")

    def on_epoch(entry: dict[str, Any]) -> None:
        tune.report({**entry, "trial_key": spec["id"], "final": False})

    kind = spec.get("kind")
    if kind in CHECKPOINTED_KINDS + SEQUENCE_CHECKPOINTED_KINDS:  # each epoch (task) reported once, with its checkpoint
        store = TuneTrialCheckpoints if kind in CHECKPOINTED_KINDS else TuneSequenceCheckpoints
        checkpoints = store(spec["id"], {"trial_key": spec["id"], "final": False})
        meta = run_trial(spec, JobInputs.fetch(spec["inputs"], inputs), None, checkpoints)
    else:
        meta = run_trial(spec, JobInputs.fetch(spec["inputs"], inputs), on_epoch)
    result = {**meta, "trial_key": spec["id"], "host": os.uname().nodename,
              "ray_node": ray.get_runtime_context().get_node_id(), "final": True}
    write_done(done_dir, spec["id"], result)
    tune.report(result)


# ----------------------------------------------------------------------------- driver
def _child_params(spec: dict) -> dict[str, Any]:
    keep = ("sweep", "name", "family", "arch", "task", "seed", "kind", "point", "method", "recast", "train",
            "method_name", "epochs", "lr", "options")
    return {k: spec[k] for k in keep if k in spec and spec[k] not in (None, {}, [])}


def _storage(rt: RuntimeParams) -> str:
    return rt.storage or str(resolve(rt.cache_dir) / "tune")


def _tuner(trainable, name: str, storage: str, param_space: dict, tune_config: tune.TuneConfig,
           rt: RuntimeParams, logger: TrialLogger) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the stored experiment ``name`` restored (unfinished and errored trials rerun)."""
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True), True
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=[logger], verbose=0,
                                failure_config=tune.FailureConfig(max_failures=rt.max_retries),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1))  # the last epoch's only
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config), False


def _experiments(sweep: str, cfg: SweepBase, specs: list[dict], key: str,
                 asha: bool) -> list[tuple[str, dict, tune.TuneConfig]]:
    """(name, param space, TuneConfig) of each Tuner the sweep runs."""
    if not isinstance(cfg, HpoSweep):
        axes = {a: sorted({s[a] for s in specs}, key=str) for a in ("name", "task", "seed")}
        grid = {(n, t, s) for n in axes["name"] for t in axes["task"] for s in axes["seed"]}
        assert grid == {(s["name"], s["task"], s["seed"]) for s in specs}, "specs are not a full grid"
        space = {a: tune.grid_search(v) for a, v in axes.items()}
        return [(f"{sweep}-{key}", space, tune.TuneConfig())]
    out = []
    for spec in specs:
        # one lr per trial from the shared grid (equal bounds fix it); every other setting is the config's
        space = {"name": spec["name"], "task": spec["task"], "seed": spec["seed"],
                 "lr": tune.loguniform(*cfg.lr) if cfg.lr[0] < cfg.lr[1] else cfg.lr[0]}
        # a trial reports once per task, then its final result one iteration later
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=len(spec["tasks"]) + 1,
                                  grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor) \
            if asha else FIFOScheduler()
        tc = tune.TuneConfig(metric="val_acc", mode="max", num_samples=cfg.num_samples, scheduler=scheduler,
                             search_alg=BasicVariantGenerator(random_state=cfg.search_seed))
        label = f"{spec['name']}-s{spec['seed']}"
        out.append((f"{sweep}-{key}-{label}", space, tc))
    return out


def lr_by_method(best: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``hpo``: the chosen lr per method (``best_per_group``'s; over several tasks or seeds, the
    median of theirs, rounded to 3 significant digits): ``tune.lr_by_method.archs.<arch>``."""
    per: dict[str, list[float]] = {}
    for b in best.values():
        per.setdefault(b["name"], []).append(float(b["lr"]))
    return {name: float(f"{statistics.median(v):.3g}") for name, v in sorted(per.items())}


def best_per_group(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """``hpo``: per method, task and seed, the finished trial with the best validation accuracy."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r.get("final"):
            continue
        group = f"{r['name']}|{r['task']}|s{r['seed']}"
        if group not in best or r["val_acc"] > best[group]["val_acc"]:
            best[group] = {k: r.get(k) for k in ("name", "task", "seed", "lr", "val_acc", "test_acc", "id",
                                                 "val_acc_by_task")}
    return best


def run_sweep(sweep: str, cfg: SweepBase, rt: RuntimeParams, asha: bool | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; returns its summary (also written to ``summary.json``)."""
    store = InputStore(rt.storage)
    specs = build_specs(sweep, cfg, job_device(rt), store)
    preflight(specs, cfg)
    asha = cfg.asha if asha is None and isinstance(cfg, HpoSweep) else bool(asha)
    key = sweep_key(sweep, specs) + ("" if not isinstance(cfg, HpoSweep) else ("-asha" if asha else "-fifo"))
    by_point = {point_of(s): s for s in specs}
    init_ray(rt)
    storage = _storage(rt)
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, specs=by_point, inputs=store.refs(specs),
                             done_dir=f"{storage.rstrip('/')}/{sweep}-{key}/done", threads=rt.torch_threads,
                             code=code_fingerprint()),
        {"cpu": rt.cpus_per_task, "gpu": rt.gpus_per_task})

    def child(config: dict) -> tuple[str, dict]:
        spec = trial_spec(by_point, config)
        return spec["id"], _child_params(spec)

    logger = TrialLogger(sweep, rt.experiment, {"sweep": sweep, "asha": asha, **cfg.model_dump(exclude={"runtime"})},
                         key, child)
    rows, restored = [], 0
    start = time.perf_counter()
    try:
        for name, space, tc in _experiments(sweep, cfg, specs, key, asha):
            tuner, was_restored = _tuner(trainable, name, storage, space, tc, rt, logger)
            restored += was_restored
            grid = tuner.fit()
            failed = [str(r.error) for r in grid if r.error is not None]
            if failed:
                raise RuntimeError(f"sweep {sweep}: {len(failed)} trial(s) failed after {rt.max_retries} retries "
                                   f"(rerun to resume): {failed[0][:2000]}")
            # ResultGrid: one result per trial, its config and last report (get_dataframe() holds the
            # same values, but as pandas columns: an int column with a gap becomes float)
            for result in grid:
                logger.log(result.config, result.metrics)  # idempotent: trials the callback missed
                rows.append(_row(by_point, result.config, result.metrics))
    except BaseException:
        logger.close(None, [], status="FAILED")  # finished trials stay stored and logged; a rerun resumes
        raise
    wall = time.perf_counter() - start
    extra = {"trials": len(rows), "logged_here": logger.new_children, "restored_experiments": restored,
             "wall_s": round(wall, 2), "trial_seconds_total": round(sum(r.get("trial_seconds", 0.0) for r in rows), 2),
             "num_cpus": rt.num_cpus, "cpus_per_task": rt.cpus_per_task}
    if isinstance(cfg, HpoSweep):
        best = best_per_group(rows)
        extra.update(asha=asha, stopped_early=sum(not r.get("final") for r in rows), best=best,
                     sweep_key=key, lr_source=f"hpo:{key}", lr_by_method=lr_by_method(best))
    summary, paths = write_report(sweep, rows, resolve(cfg.out_dir) / sweep, extra)
    parent_metrics = {"trials": len(rows), "wall_s": wall}
    parent_metrics.update({f"{name}.acc_mean": p["acc_mean"] for name, p in summary["points"].items()})
    logger.close(parent_metrics, paths)
    summary["mlflow_parent_run"] = logger.parent_id
    summary["mlflow_new_children"] = logger.new_children
    return summary


def _row(by_point: dict[str, dict], config: dict, metrics: dict) -> dict[str, Any]:
    """One table row from a trial's config and last reported result."""
    spec = trial_spec(by_point, config)
    skip = {"config", "done", "time_this_iter_s", "time_since_restore", "iterations_since_restore", "timestamp",
            "checkpoint_dir_name", "date", "should_checkpoint", "trial_key", "train_loss"}
    meta = {k: v for k, v in metrics.items() if k not in skip}
    return make_row(spec, meta)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, choices=SWEEP_NAMES)
    ap.add_argument("--config", default=None, help="sweep YAML (default pipelines/configs/<sweep>.yaml)")
    ap.add_argument("--params", default=None, help="params.yaml whose runtime section is the base")
    ap.add_argument("--num-cpus", type=int, default=None, help="override runtime.num_cpus (local Ray only)")
    ap.add_argument("--no-asha", action="store_true", help="hpo: the same trials without early stopping")
    args = ap.parse_args(argv)
    cfg = load_config(args.sweep, args.config)
    rt = runtime_params(cfg, args.params, args.num_cpus)
    summary = run_sweep(args.sweep, cfg, rt, asha=False if args.no_asha else None)
    print(f"sweep {args.sweep}: {summary['trials']} trials ({summary['logged_here']} new in MLflow) "
          f"in {summary['wall_s']:.1f} s -> {resolve(cfg.out_dir) / args.sweep}")
    for name, p in summary["points"].items():
        print(f"  {name:28s} acc {p['acc_mean']:.4f} +- {p['acc_std']:.4f}  ({p['trials']} trials)")
    for group, b in summary.get("best", {}).items():
        print(f"  best {group}: lr {b['lr']:.4g} val {b['val_acc']:.4f} (test {b['test_acc']:.4f}, not used)")
    if "lr_by_method" in summary:
        print(f"  tune.lr_by_method (source {summary['lr_source']}): archs.{cfg.arch}: {summary['lr_by_method']}")
    return summary


if __name__ == "__main__":
    # Run from the importable module, not __main__, so Ray pickles trial functions by reference.
    from pipelines.sweep import main as _main

    _main()
