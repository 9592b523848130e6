"""Sweep driver: trials as Ray tasks (``stages.fanout.run_jobs``), MLflow runs, table and plots.

    python -m pipelines.sweep --sweep gn|k|targets|budget|order|seeds [--config FILE] [--num-cpus N]

Each trial is a spec dict run by ``pipelines.trials.run_trial`` with the resources of params.yaml's
``runtime`` section (overridden by the sweep config's ``runtime``), retried when its worker dies.
Finished trials are cached under ``<runtime.cache_dir>/sweep_<sweep>/``: a rerun recomputes none
of them and logs none of them to MLflow again (see ``pipelines.tracking``). Outputs:
``<out_dir>/<sweep>/{results.parquet,results.md,summary.json,<sweep>.png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from typing import Any

from pipelines.config import SWEEP_NAMES, SweepBase, load_config, runtime_params
from stages.common import resolve
from stages.params import RuntimeParams


def sweep_key(sweep: str, specs: list[dict]) -> str:
    """Identity of a sweep run: its name and the cache keys of its trials."""
    from stages.fanout import spec_key

    keys = sorted(spec_key(s) for s in specs)
    return hashlib.sha256(json.dumps([sweep, keys]).encode()).hexdigest()[:20]


def _child_params(spec: dict) -> dict[str, Any]:
    keep = ("sweep", "name", "family", "arch", "task", "seed", "kind", "point", "method", "recast", "train",
            "method_name", "epochs", "lr", "options")
    return {k: spec[k] for k in keep if k in spec and spec[k] not in (None, {}, [])}


def preflight(specs: list[dict], cfg: SweepBase) -> None:
    """Fail in the driver, before any Ray task, on a RECAST variant that does not fit the backbone
    (e.g. G not dividing the depth), naming the variant."""
    from pipelines.specs import recast_variants
    from recast.targets import build_plan
    from stages.backbones import load_backbone

    variants = recast_variants(specs)
    if not variants:
        return
    model = load_backbone(cfg.arch, resolve(cfg.pretrain_dir)).plain()
    for v in variants:
        try:
            build_plan(model, v.recast_config())
        except ValueError as err:
            raise ValueError(f"{v.preset} with {v.overrides} does not fit arch '{cfg.arch}': {err}") from None


def run_sweep(sweep: str, cfg: SweepBase, rt: RuntimeParams) -> dict[str, Any]:
    """Run (or resume) a sweep; returns its summary (also written to ``summary.json``)."""
    from pipelines.report import make_row, write_report
    from pipelines.specs import build_specs
    from pipelines.tracking import SweepTracker
    from pipelines.trials import run_trial
    from stages.fanout import run_jobs, spec_key
    from stages.inputs import InputStore
    from stages.runtime import job_device

    store = InputStore(rt.storage)
    specs = build_specs(sweep, cfg, job_device(rt), store)
    preflight(specs, cfg)
    tracker = SweepTracker(sweep, rt.experiment, {"sweep": sweep, **cfg.model_dump(exclude={"runtime"})},
                           sweep_key(sweep, specs))
    rows: list[dict] = []
    computed = 0

    def on_result(spec: dict, result, cached: bool) -> None:
        nonlocal computed
        meta, _ = result
        row = make_row(spec, meta, cached)
        rows.append(row)
        computed += not cached
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.log_trial(spec["id"], spec_key(spec), _child_params(spec), metrics, cached)

    start = time.perf_counter()
    try:
        run_jobs(f"sweep_{sweep}", run_trial, specs, rt, on_result, inputs=store)
    except BaseException:
        tracker.finish(status="FAILED")  # finished trials stay cached and logged; a rerun resumes
        raise
    wall = time.perf_counter() - start
    extra = {"trials": len(specs), "computed": computed, "cached": len(specs) - computed, "wall_s": round(wall, 2),
             "trial_seconds_total": round(sum(r.get("trial_seconds", 0.0) for r in rows), 2),
             "num_cpus": rt.num_cpus, "cpus_per_task": rt.cpus_per_task}
    summary, paths = write_report(sweep, rows, resolve(cfg.out_dir) / sweep, extra)
    parent_metrics = {"trials": len(specs), "computed": computed, "wall_s": wall}
    parent_metrics.update({f"{name}.acc_mean": p["acc_mean"] for name, p in summary["points"].items()})
    tracker.close(parent_metrics, paths)
    summary["mlflow_parent_run"] = tracker.parent_id
    summary["mlflow_new_children"] = tracker.new_children
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, choices=SWEEP_NAMES)
    ap.add_argument("--config", default=None, help="sweep YAML (default pipelines/configs/<sweep>.yaml)")
    ap.add_argument("--params", default=None, help="params.yaml whose runtime section is the base")
    ap.add_argument("--num-cpus", type=int, default=None, help="override runtime.num_cpus (local Ray only)")
    args = ap.parse_args(argv)
    cfg = load_config(args.sweep, args.config)
    rt = runtime_params(cfg, args.params, args.num_cpus)
    summary = run_sweep(args.sweep, cfg, rt)
    print(f"sweep {args.sweep}: {summary['trials']} trials ({summary['computed']} computed, "
          f"{summary['cached']} cached) in {summary['wall_s']:.1f} s -> {resolve(cfg.out_dir) / args.sweep}")
    for name, p in summary["points"].items():
        print(f"  {name:28s} acc {p['acc_mean']:.4f} +- {p['acc_std']:.4f}  ({p['trials']} trials)")
    return summary


if __name__ == "__main__":
    # Run from the importable module, not __main__, so Ray pickles trial functions by reference.
    from pipelines.sweep import main as _main

    _main()
