"""Fan-out of a stage's jobs as Ray tasks, with retries and resume.

Each job is a JSON-serialisable spec with a stable id; its result (a JSON dict plus optional
tensors) comes back to the driver, which writes it to the job cache
(``<cache_dir>/<stage>/<key>.{json,safetensors}``, keyed by a hash of the spec) through
temp-file + rename. ``store_tensors`` publishes a job's tensor file as a hard link to that
cache file, so a stage output and the job cache hold one copy. A re-run of a killed stage finds finished jobs there and skips them.
Ray retries a task whose worker dies (``max_retries``).

Jobs read nothing from the driver's disk: their inputs come from a ``stages.inputs.InputStore``
(object refs, or a storage URI), and the code they run is the driver's source tree, shipped as
Ray's ``runtime_env.working_dir`` (a local Ray included); each job checks that its code
fingerprint equals the driver's. A job that fails reaches the driver as a ``JobError`` naming
the job and the original error's type and message.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from recast.io import TENSOR_FILE_METADATA, save_tensors
from stages.common import resolve, write_json_atomic
from stages.inputs import InputStore, JobInputs
from stages.params import RuntimeParams

Result = tuple[dict[str, Any], dict[str, torch.Tensor]]
JobFn = Callable[[dict, JobInputs], Result]
FAULT_ENV = "RECAST_FAULT_ONCE_DIR"  # tests: a job whose marker is absent kills its worker once


CODE_PACKAGES = ("recast", "stages", "pipelines")
CODE_ROOT = Path(__file__).resolve().parent.parent  # the source tree shipped to every job
# not shipped (gitignore patterns, anchored at CODE_ROOT; Ray also skips what .gitignore lists)
CODE_EXCLUDES = ["/.git", "/.venv", "/data", "/outputs", "/mlartifacts", "/mlruns", "/mlflow.db", "/.dvc/cache",
                 "/metrics", "/reports", "/benchmarks/results", "__pycache__", "*.safetensors", "*.parquet"]


class JobError(RuntimeError):
    """A job failed: names the job and the original error's type and message (and its traceback)."""

    def __init__(self, job_id: str, error_type: str, message: str, traceback: str = "") -> None:
        self.job_id, self.error_type, self.message, self.traceback = job_id, error_type, message, traceback
        super().__init__(job_id, error_type, message, traceback)

    def __str__(self) -> str:
        return f"job {self.job_id} failed: {self.error_type}: {self.message}"


class CodeVersionError(RuntimeError):
    """A job imported other code than the driver's (e.g. a node's stale install)."""


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


def check_code(expected: str) -> None:
    """Raise CodeVersionError unless this process's code fingerprint is ``expected`` (the driver's)."""
    actual = code_fingerprint()
    if actual != expected:
        where = {p: str(Path(importlib.util.find_spec(p).origin).parent) for p in CODE_PACKAGES}
        raise CodeVersionError(f"code fingerprint {actual} differs from the driver's {expected}: this worker "
                               f"imports {where}, not the source shipped with the run (runtime_env.working_dir); "
                               f"remove or update the node's own install of recast")


def init_ray(rt: RuntimeParams):
    """Connect to RAY_ADDRESS or start a local Ray with explicit CPUs, no dashboard; either way the
    driver's source tree is every job's working_dir."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
                "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    if os.environ.get(FAULT_ENV):
        env_vars[FAULT_ENV] = os.environ[FAULT_ENV]
    runtime_env: dict[str, Any] = {"env_vars": env_vars, "working_dir": str(CODE_ROOT), "excludes": CODE_EXCLUDES}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=rt.num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False, configure_logging=False)
    return ray


def _maybe_fault(job_id: str) -> None:
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


def _execute(fn: JobFn, spec: dict, threads: int, code: str, refs: dict[str, Any]) -> tuple[dict, dict]:
    """The Ray task: check the code version, fetch the inputs, run ``fn``, measure it. Any error
    becomes a JobError naming the job (which pickles whatever the original error was)."""
    from stages.memory import current_rss_mb, peak_memory, reset_peak_memory

    _maybe_fault(spec["id"])
    try:
        check_code(code)
        torch.set_num_threads(max(1, threads))
        device = spec.get("device", "cpu")
        reset_peak_memory(device)  # a reused Ray worker's earlier jobs must not count
        rss_start = current_rss_mb()
        start = time.perf_counter()
        meta, tensors = fn(spec, JobInputs.fetch(spec.get("inputs", {}), refs))
    except Exception as err:  # noqa: BLE001 - every job error reaches the driver as a JobError
        raise JobError(spec["id"], type(err).__name__, str(err), traceback.format_exc()) from None
    measured = {"rss_start_mb": rss_start, **peak_memory(device)}  # a job's own finer measurement wins
    meta = {**measured, **meta, "job_wall_s": time.perf_counter() - start, "host": os.uname().nodename,
            "ray_node": _ray_node()}
    return meta, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _job_error(job_id: str, err: Exception) -> JobError:
    """The driver's view of a failed Ray task: the job's JobError, or Ray's own error named."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, JobError):
        return cause
    if cause is not None:
        return JobError(job_id, type(cause).__name__, str(cause))
    return JobError(job_id, type(err).__name__, str(err))


def _cache_paths(cache: Path, key: str) -> tuple[Path, Path]:
    return cache / f"{key}.json", cache / f"{key}.safetensors"


def job_file(rt: RuntimeParams, stage: str, spec: dict, suffix: str) -> Path:
    """``<cache_dir>/<stage>/<key><suffix>``: a file of ``spec``'s job in the job cache
    (``.safetensors``: its tensors; ``.mlflow.json``: where its artifacts were logged)."""
    return resolve(rt.cache_dir) / stage / f"{spec_key(spec)}{suffix}"


def store_tensors(rt: RuntimeParams, stage: str, spec: dict, tensors: dict[str, torch.Tensor], meta: dict,
                  dest: Path) -> Path:
    """Write a job's tensors as ``<dest>.safetensors`` + ``<dest>.json`` (``recast.io`` layout).

    The tensor file is a hard link to the job's file in the job cache (the same bytes: the cache
    writes ``recast.io``'s header metadata too), so the two share one copy on disk; a fresh
    ``save_tensors`` when the cache has no file for the job."""
    cached = job_file(rt, stage, spec, ".safetensors")
    if not cached.exists():
        return save_tensors(tensors, meta, dest)
    st = dest.with_name(dest.name + ".safetensors")
    st.parent.mkdir(parents=True, exist_ok=True)
    tmp = st.with_name(f"{st.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(cached, tmp)
    except OSError:  # another file system (or no hard links): one copy more
        shutil.copyfile(cached, tmp)
    os.replace(tmp, st)
    write_json_atomic(dest.with_name(dest.name + ".json"), meta)
    return st


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
        save_file(tensors, str(tmp), metadata=TENSOR_FILE_METADATA)
        os.replace(tmp, st)
    write_json_atomic(js, {**meta, "_has_tensors": bool(tensors)})


def run_jobs(
    stage: str,
    fn: JobFn,
    specs: list[dict],
    rt: RuntimeParams,
    on_result: Callable[[dict, Result, bool], None] | None = None,
    inputs: InputStore | None = None,
) -> dict[str, Result]:
    """Run ``fn(spec, job_inputs)`` for every spec as Ray tasks; returns {spec id: (meta, tensors)}.

    A spec's ``inputs`` (role -> key of ``inputs``) reach its job as ``stages.inputs.JobInputs``;
    each bundle is put into the object store (or uploaded to ``rt.storage``) once per call.
    ``on_result(spec, result, cached)`` is called in the driver as results arrive (MLflow).
    The first failed job raises ``JobError`` (id, original error type and message).
    """
    ids = [s["id"] for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{stage}: duplicate job ids")
    store = inputs or InputStore(rt.storage)
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
    refs_by_key = store.refs(pending)
    remote = ray.remote(num_cpus=rt.cpus_per_task, num_gpus=rt.gpus_per_task, max_retries=rt.max_retries)(_execute)
    threads = max(1, int(rt.cpus_per_task))
    code = code_fingerprint()
    refs = {}
    for spec in pending:
        needed = {k: refs_by_key[k] for k in set(spec.get("inputs", {}).values())}
        refs[remote.remote(fn, spec, threads, code, needed)] = spec
    bar = tqdm(total=len(specs), initial=len(results), desc=stage, disable=not rt.progress)
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            spec = refs.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as err:
                for ref in refs:
                    ray.cancel(ref)
                raise _job_error(spec["id"], err) from None
            _write_cached(cache, spec_key(spec), result)
            results[spec["id"]] = result
            if on_result:
                on_result(spec, result, False)
            bar.update(1)
    finally:
        bar.close()
    return results
