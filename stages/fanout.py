"""Fan-out of a stage's jobs as Ray tasks, with retries and resume.

Each job is a JSON-serialisable spec with a stable id; its result (a JSON dict plus optional
tensors) comes back to the driver, which writes it to the job cache
(``<cache_dir>/<stage>/<key>.{json,safetensors}``, keyed by a hash of the spec) through
temp-file + rename. A re-run of a killed stage finds finished jobs there and skips them.
Ray retries a task whose worker dies (``max_retries``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stages.common import REPO_ROOT, resolve, write_json_atomic
from stages.params import RuntimeParams

Result = tuple[dict[str, Any], dict[str, torch.Tensor]]
FAULT_ENV = "RECAST_FAULT_ONCE_DIR"  # tests: a job whose marker is absent kills its worker once
MARKER_ENV = "RECAST_TRIAL_MARKER_DIR"  # tests: each sweep trial that computes leaves a file here


CODE_PACKAGES = ("recast", "stages", "pipelines")


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the Python source of the packages jobs run (``CODE_PACKAGES``).

    Part of every job's cache key: after a code change (which makes DVC re-run the stage) no job
    reuses a result the old code computed; a stage killed and re-run with the same code resumes.
    """
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(root).rglob("*.py")):
                digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def spec_key(spec: dict[str, Any]) -> str:
    """Stable hash of a job spec and of the code that runs it (the job's cache key)."""
    keyed = {"spec": spec, "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:20]


def init_ray(rt: RuntimeParams):
    """Connect to RAY_ADDRESS or start a local Ray with explicit CPUs, no dashboard."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
                "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    env_vars.update({k: os.environ[k] for k in (FAULT_ENV, MARKER_ENV) if os.environ.get(k)})
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if address:
        runtime_env["working_dir"] = str(REPO_ROOT)
        runtime_env["excludes"] = [".git", ".venv", "data", "outputs", "mlartifacts", "mlflow.db", ".dvc/cache"]
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=rt.num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False, configure_logging=False)
    return ray


def maybe_fault(job_id: str) -> None:
    """Tests: with RECAST_FAULT_ONCE_DIR set, exit this process the first time ``job_id`` runs."""
    fault_dir = os.environ.get(FAULT_ENV)
    if not fault_dir:
        return
    marker = Path(fault_dir) / f"{job_id.replace('/', '_')}.killed"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("killed once\n")
        os._exit(1)  # simulate a worker lost mid-task


def _ray_node() -> str:
    """Id of the Ray node running this job ("" when it runs inline, outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _execute(fn: Callable[[dict], Result], spec: dict, threads: int) -> tuple[dict, dict]:
    from stages.memory import current_rss_mb, peak_memory, reset_peak_memory

    torch.set_num_threads(max(1, threads))
    maybe_fault(spec["id"])
    device = spec.get("device", "cpu")
    reset_peak_memory(device)  # a reused Ray worker's earlier jobs must not count
    rss_start = current_rss_mb()
    start = time.perf_counter()
    meta, tensors = fn(spec)
    measured = {"rss_start_mb": rss_start, **peak_memory(device)}  # a job's own finer measurement wins
    meta = {**measured, **meta, "job_wall_s": time.perf_counter() - start, "host": os.uname().nodename,
            "ray_node": _ray_node()}
    return meta, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _cache_paths(cache: Path, key: str) -> tuple[Path, Path]:
    return cache / f"{key}.json", cache / f"{key}.safetensors"


def _read_cached(cache: Path, key: str) -> Result | None:
    js, st = _cache_paths(cache, key)
    if not js.exists():
        return None
    meta = json.loads(js.read_text())
    tensors = load_file(str(st)) if meta.get("_has_tensors") else {}
    return meta, tensors


def _write_cached(cache: Path, key: str, result: Result) -> None:
    meta, tensors = result
    js, st = _cache_paths(cache, key)
    cache.mkdir(parents=True, exist_ok=True)
    if tensors:
        tmp = st.with_name(st.name + f".{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, st)
    write_json_atomic(js, {**meta, "_has_tensors": bool(tensors)})


def run_jobs(
    stage: str,
    fn: Callable[[dict], Result],
    specs: list[dict],
    rt: RuntimeParams,
    on_result: Callable[[dict, Result, bool], None] | None = None,
) -> dict[str, Result]:
    """Run ``fn(spec)`` for every spec as Ray tasks; returns {spec id: (meta, tensors)}.

    ``on_result(spec, result, cached)`` is called in the driver as results arrive (MLflow).
    """
    ids = [s["id"] for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{stage}: duplicate job ids")
    cache = resolve(rt.cache_dir) / stage
    results: dict[str, Result] = {}
    pending = []
    for spec in specs:
        cached = _read_cached(cache, spec_key(spec))
        if cached is not None:
            results[spec["id"]] = cached
            if on_result:
                on_result(spec, cached, True)
        else:
            pending.append(spec)
    if not pending:
        return results
    ray = init_ray(rt)
    remote = ray.remote(num_cpus=rt.cpus_per_task, num_gpus=rt.gpus_per_task, max_retries=rt.max_retries)(_execute)
    threads = max(1, int(rt.cpus_per_task))
    refs = {remote.remote(fn, spec, threads): spec for spec in pending}
    bar = tqdm(total=len(specs), initial=len(results), desc=stage, disable=not rt.progress)
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            spec = refs.pop(done[0])
            result = ray.get(done[0])
            _write_cached(cache, spec_key(spec), result)
            results[spec["id"]] = result
            if on_result:
                on_result(spec, result, False)
            bar.update(1)
    finally:
        bar.close()
    return results
