"""Fan-out of a stage's jobs as Ray tasks, with retries and resume.

Each job is a JSON-serialisable spec with a stable id; its result (a JSON dict plus optional
tensors) comes back to the driver, which writes it to the job cache
(``<cache_dir>/<stage>/<key>.{json,safetensors}``, keyed by a hash of the spec without its
paths) through temp-file + rename, under a per-entry file lock. The JSON records the sha256 of
the metadata and of the tensor file; an entry that does not match them (a flipped byte, a
truncated file) is discarded with a warning and the job computed again. A re-run of a killed
stage finds finished jobs there and skips them. Ray retries a task whose worker dies
(``max_retries``). ``stage_lock`` serialises concurrent runs of one stage.
``store_tensors`` publishes a job's tensor file as a hard link to its cache file, so a stage
output and the job cache hold one copy.

Jobs read nothing from the driver's disk: their inputs come from a ``stages.jobs.inputs.InputStore``
(object refs, or a storage URI), and the code they run is the driver's source tree, shipped as
Ray's ``runtime_env.working_dir`` (a local Ray included); each job checks that its code
fingerprint equals the driver's. A job that fails reaches the driver as a ``JobError`` naming
the job and the original error's type and message.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from recast.io import save_tensors, write_tensor_file
from recast.machine import KERNEL_ENV, machine_record
from stages.config.common import file_lock, resolve, resolve_shared, temp_path, write_json_atomic
from stages.jobs.inputs import InputStore, JobInputs
from stages.config.params import RuntimeParams

Result = tuple[dict[str, Any], dict[str, torch.Tensor]]
JobFn = Callable[[dict, JobInputs], Result]
FAULT_ENV = "RECAST_FAULT_ONCE_DIR"  # tests: a job whose marker is absent kills its worker once
FAULT_POINT_ENV = "RECAST_FAULT_POINT"  # tests: where (comma list): "start" (default), "epoch:<k>", "task:<k>"
MARKER_ENV = "RECAST_TRIAL_MARKER_DIR"  # tests: each sweep trial that computes leaves a file here


CODE_PACKAGES = ("recast", "stages", "pipelines")
CODE_ROOT = Path(__file__).resolve().parents[2]  # the source tree shipped to every job
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


# Fields holding where an input lives; its content enters the key through a digest field
# (backbone_sha, bank_sha, task_sha, source_sha), so a copied or moved project keys the same.
PATH_FIELDS = frozenset({"task_dir", "task_dirs", "data_dir", "pretrain_dir", "mimic_dir", "out_dir", "cache_dir",
                         "checkpoint_dir"})


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if k not in PATH_FIELDS}
    if isinstance(value, (list, tuple)):
        return [_without_paths(v) for v in value]
    return value


def spec_key(spec: dict[str, Any]) -> str:
    """Stable hash of a job spec (without its path fields, ``PATH_FIELDS``) and of the code that
    runs it: the job's cache key."""
    keyed = {"spec": _without_paths(spec), "code": code_fingerprint()}
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
    env_vars.update({k: os.environ[k] for k in (FAULT_ENV, FAULT_POINT_ENV, MARKER_ENV, *KERNEL_ENV)
                     if os.environ.get(k)})
    runtime_env: dict[str, Any] = {"env_vars": env_vars, "working_dir": str(CODE_ROOT), "excludes": CODE_EXCLUDES}
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        # The local Ray's ports are open on the node's address (ray resolves 127.0.0.1 to it), so
        # it runs with token authentication: ray >= 2.59 (pinned in pyproject) turns it on for a
        # new local cluster unless RAY_AUTH_MODE=disabled, and writes a token to ~/.ray/auth_token.
        # Setting RAY_AUTH_MODE here would come too late for Ray's already-read config; the
        # driver-fault test checks the mode of the cluster a stage started.
        ray.init(num_cpus=rt.num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False, configure_logging=False)
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)  # ray.init replaced the stage's handler (runs end KILLED)
    return ray


def maybe_fault(job_id: str, point: str = "start") -> None:
    """Tests: with RECAST_FAULT_ONCE_DIR set, exit this process the first time ``job_id`` reaches
    ``point``, the one named by RECAST_FAULT_POINT (default ``start``; ``epoch:<k>`` / ``task:<k>``:
    once its checkpoint after epoch / task k is written)."""
    fault_dir = os.environ.get(FAULT_ENV)
    if not fault_dir or point not in os.environ.get(FAULT_POINT_ENV, "start").split(","):
        return
    suffix = "" if point == "start" else "." + point.replace(":", "")
    marker = Path(fault_dir) / f"{job_id.replace('/', '_')}{suffix}.killed"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("killed once\n")
        os._exit(1)  # simulate a worker lost mid-task


def _ray_node() -> str:
    """Id of the Ray node running this job ("" when it runs inline, outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _execute(fn: JobFn, spec: dict, threads: int, code: str, refs: dict[str, Any]) -> tuple[dict, dict]:
    """The Ray task: ``_measured`` with the inputs fetched through Ray (or from the storage URI)."""
    maybe_fault(spec["id"])
    return _measured(fn, spec, threads, code, lambda: JobInputs.fetch(spec.get("inputs", {}), refs))


def _measured(fn: JobFn, spec: dict, threads: int, code: str, inputs: Callable[[], JobInputs]) -> tuple[dict, dict]:
    """Check the code version, get the inputs, run ``fn``, measure it. Any error becomes a
    JobError naming the job (which pickles whatever the original error was)."""
    from stages.jobs.memory import current_rss_mb, peak_memory, reset_peak_memory

    try:
        check_code(code)
        torch.set_num_threads(max(1, threads))
        device = spec.get("device", "cpu")
        reset_peak_memory(device)  # a reused Ray worker's earlier jobs must not count
        rss_start = current_rss_mb()
        start = time.perf_counter()
        meta, tensors = fn(spec, inputs())
        machine = machine_record()  # what its float results depend on besides spec and code
    except Exception as err:  # noqa: BLE001 - every job error reaches the driver as a JobError
        raise JobError(spec["id"], type(err).__name__, str(err), traceback.format_exc()) from None
    measured = {"rss_start_mb": rss_start, **peak_memory(device, rss_start)}  # a job's own finer measurement wins
    meta = {**measured, **meta, "job_wall_s": time.perf_counter() - start, "host": os.uname().nodename,
            "ray_node": _ray_node(), "_machine": machine}
    return meta, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def runs_inline(rt: RuntimeParams, pending: int) -> bool:
    """Whether a stage's ``pending`` jobs run in the driver process instead of as Ray tasks: at
    most ``rt.inline_jobs`` of them, no cluster (RAY_ADDRESS unset), no Ray already running in
    this process, and no fault injection (it simulates losing a Ray worker). A local Ray's start
    and its workers' imports cost about 15 s per stage, more than one small job."""
    if pending > rt.inline_jobs or os.environ.get("RAY_ADDRESS") or os.environ.get(FAULT_ENV):
        return False
    ray = sys.modules.get("ray")
    return not (ray is not None and ray.is_initialized())


def _run_inline(fn: JobFn, spec: dict, threads: int, store: InputStore) -> Result:
    """One job in this process, measured like a Ray task; its inputs read from the driver's files."""
    previous = torch.get_num_threads()
    try:
        return _measured(fn, spec, threads, code_fingerprint(), lambda: store.local(spec.get("inputs", {})))
    finally:
        torch.set_num_threads(previous)


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
    return resolve_shared(rt.cache_dir) / stage / f"{spec_key(spec)}{suffix}"


def checkpoint_location(rt: RuntimeParams, stage: str, spec: dict) -> str:
    """Where ``spec``'s job keeps its checkpoints (``stages.jobs.checkpoints``): under
    ``runtime.storage`` when set (every node reads it), else in the local job cache."""
    if rt.storage:
        return f"{rt.storage.rstrip('/')}/checkpoints/{stage}/{spec_key(spec)}"
    return str(resolve(rt.cache_dir) / stage / "checkpoints" / spec_key(spec))


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
    tmp = temp_path(st)
    try:
        os.link(cached, tmp)
    except OSError:  # another file system (or no hard links): one copy more
        shutil.copyfile(cached, tmp)
    os.replace(tmp, st)
    write_json_atomic(dest.with_name(dest.name + ".json"), meta)
    return st


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _meta_sha256(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _entry_lock(cache: Path, key: str):
    return file_lock(cache / f"{key}.lock")


def _read_cached(cache: Path, key: str) -> Result | None:
    """A cached result whose digests match, else None (a bad entry is removed, with a warning)."""
    js, st = _cache_paths(cache, key)
    if not js.exists():
        return None
    with _entry_lock(cache, key):
        try:
            entry = json.loads(js.read_text())
            meta, tensors_sha = entry["meta"], entry["tensors_sha256"]
            if _meta_sha256(meta) != entry["meta_sha256"]:
                raise ValueError("metadata does not match its sha256")
            tensors = {}
            if tensors_sha is not None:
                if _file_sha256(st) != tensors_sha:
                    raise ValueError(f"{st.name} does not match its sha256")
                tensors = load_file(str(st))
            return meta, tensors
        except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, truncated or edited
            warnings.warn(f"job cache entry {js} is corrupt ({type(err).__name__}: {err}); discarding it, "
                          "the job runs again", stacklevel=2)
            js.unlink(missing_ok=True)
            st.unlink(missing_ok=True)
            return None


def _write_cached(cache: Path, key: str, result: Result) -> None:
    meta, tensors = result
    js, st = _cache_paths(cache, key)
    cache.mkdir(parents=True, exist_ok=True)
    with _entry_lock(cache, key):
        tensors_sha = None
        if tensors:
            tmp = temp_path(st)
            write_tensor_file(tensors, tmp)  # the same header as recast.io's files: publishable as a hard link
            tensors_sha = _file_sha256(tmp)
            os.replace(tmp, st)
        write_json_atomic(js, {"meta": meta, "meta_sha256": _meta_sha256(meta), "tensors_sha256": tensors_sha})


@contextlib.contextmanager
def stage_lock(stage: str, rt: RuntimeParams) -> Iterator[None]:
    """Hold ``<cache_dir>/<stage>.lock`` for a whole stage run: a second run of the same stage
    waits, then finds the first one's jobs in the cache."""
    with file_lock(resolve_shared(rt.cache_dir) / f"{stage}.lock", waiting=f"{stage}: another run of this stage is in progress"):
        yield


def run_jobs(
    stage: str,
    fn: JobFn,
    specs: list[dict],
    rt: RuntimeParams,
    on_result: Callable[[dict, Result, bool], None] | None = None,
    inputs: InputStore | None = None,
) -> dict[str, Result]:
    """Run ``fn(spec, job_inputs)`` for every spec as Ray tasks; returns {spec id: (meta, tensors)}.

    Jobs found in the cache are not run; when at most ``rt.inline_jobs`` remain and Ray is local
    (``runs_inline``), they run in this process without starting Ray.

    A spec's ``inputs`` (role -> key of ``inputs``) reach its job as ``stages.jobs.inputs.JobInputs``;
    each bundle is put into the object store (or uploaded to ``rt.storage``) once per call.
    ``on_result(spec, result, cached)`` is called in the driver as results arrive (MLflow).
    The first failed job raises ``JobError`` (id, original error type and message).
    """
    ids = [s["id"] for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{stage}: duplicate job ids")
    store = inputs or InputStore(rt.storage)
    cache = resolve_shared(rt.cache_dir) / stage
    results: dict[str, Result] = {}
    pending = []
    threads = rt.torch_threads
    for spec in specs:
        cached = _read_cached(cache, spec_key(spec))
        if cached is not None and cached[0].get("_machine", {}).get("torch_threads", threads) != threads:
            cached = None  # computed with another thread count: other float sums
        if cached is not None:
            results[spec["id"]] = cached
            if on_result:
                on_result(spec, cached, True)
        else:
            pending.append(spec)
    print(f"{stage}: {len(results)} of {len(specs)} jobs from the job cache {cache}", file=sys.stderr, flush=True)
    if not pending:
        return results

    def with_checkpoints(spec: dict) -> dict:  # a path field: the cache key stays the spec's
        return {**spec, "checkpoint_dir": checkpoint_location(rt, stage, spec)}

    def finish(spec: dict, result: Result) -> None:
        _write_cached(cache, spec_key(spec), result)
        if not rt.storage:  # the job deleted its own; this catches a local one it could not
            shutil.rmtree(checkpoint_location(rt, stage, spec), ignore_errors=True)
        results[spec["id"]] = result
        if on_result:
            on_result(spec, result, False)

    if runs_inline(rt, len(pending)):
        for spec in pending:
            finish(spec, _run_inline(fn, with_checkpoints(spec), threads, store))
        return results
    ray = init_ray(rt)
    refs_by_key = store.refs(pending)
    remote = ray.remote(num_cpus=rt.cpus_per_task, num_gpus=rt.gpus_per_task, max_retries=rt.max_retries)(_execute)
    code = code_fingerprint()
    refs = {}
    for spec in pending:
        needed = {k: refs_by_key[k] for k in set(spec.get("inputs", {}).values())}
        refs[remote.remote(fn, with_checkpoints(spec), threads, code, needed)] = spec
    bar = tqdm(total=len(specs), initial=len(results), desc=stage, disable=not rt.progress)
    try:
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            spec = refs.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as err:
                raise _job_error(spec["id"], err) from None
            finish(spec, result)
            bar.update(1)
    except BaseException:
        _cancel(ray, refs)
        raise
    finally:
        bar.close()
    return results


def _cancel(ray: Any, refs: dict) -> None:
    """Cancel a stopped stage's outstanding jobs (a failed job, SIGTERM, Ctrl-C): queued ones never
    start and running ones are killed, instead of computing results nobody will collect until
    Ray shuts down."""
    for ref in refs:
        with contextlib.suppress(Exception):  # Ray may be going down already: the original error wins
            ray.cancel(ref, force=True)
