"""Fan-out of a stage's jobs as Ray tasks, with retries and resume.

Each job is a JSON-serialisable spec with a stable id; its ``JobResult`` comes back to the
driver, which writes it to the job cache (``stages.jobs.cache``: a re-run of a killed stage finds
finished jobs there and skips them). Ray retries a task whose worker dies (``max_retries``).

Jobs read nothing from the driver's disk: their inputs come from a ``stages.jobs.inputs.InputStore``
(object refs, or a storage URI), and the code they run is the driver's source tree, shipped as
Ray's ``runtime_env.working_dir`` (a local Ray included); each job checks that its code
fingerprint equals the driver's. A job that fails reaches the driver as a ``JobError`` naming
the job and the original error's type and message.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from recast.machine import KERNEL_ENV, machine_record
from stages.config.common import resolve_shared, stage_logger
from stages.config.params import RuntimeParams
from stages.jobs.cache import CODE_PACKAGES, checkpoint_location, code_fingerprint, read_cached, spec_key, write_cached
from stages.jobs.faults import FAULT_ENV, FAULT_POINT_ENV, MARKER_ENV, maybe_fault
from stages.jobs.inputs import InputStore, JobInputs
from stages.jobs.result import JobResult

JobFn = Callable[[dict, JobInputs], JobResult]
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


def _ray_node() -> str:
    """Id of the Ray node running this job ("" when it runs inline, outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _execute(fn: JobFn, spec: dict, threads: int, code: str, refs: dict[str, Any]) -> JobResult:
    """The Ray task: ``_measured`` with the inputs fetched through Ray (or from the storage URI)."""
    maybe_fault(spec["id"])
    return _measured(fn, spec, threads, code, lambda: JobInputs.fetch(spec.get("inputs", {}), refs))


def _measured(fn: JobFn, spec: dict, threads: int, code: str, inputs: Callable[[], JobInputs]) -> JobResult:
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
        result = fn(spec, inputs())
        machine = machine_record()  # what its float results depend on besides spec and code
    except Exception as err:  # noqa: BLE001 - every job error reaches the driver as a JobError
        raise JobError(spec["id"], type(err).__name__, str(err), traceback.format_exc()) from None
    measured = {"rss_start_mb": rss_start, **peak_memory(device, rss_start)}  # a job's own finer measurement wins
    metrics = {**measured, **result.metrics, "job_wall_s": time.perf_counter() - start, "host": os.uname().nodename,
               "ray_node": _ray_node()}
    return replace(result, metrics=metrics, machine=machine,
                   tensors={k: v.detach().cpu().contiguous() for k, v in result.tensors.items()})


def runs_inline(rt: RuntimeParams, pending: int) -> bool:
    """Whether a stage's ``pending`` jobs run in the driver process instead of as Ray tasks: at
    most ``rt.inline_jobs`` of them, no cluster (RAY_ADDRESS unset), no Ray already running in
    this process, and no fault injection (it simulates losing a Ray worker). A local Ray's start
    and its workers' imports cost about 15 s per stage, more than one small job."""
    if pending > rt.inline_jobs or os.environ.get("RAY_ADDRESS") or os.environ.get(FAULT_ENV):
        return False
    ray = sys.modules.get("ray")
    return not (ray is not None and ray.is_initialized())


def _run_inline(fn: JobFn, spec: dict, threads: int, store: InputStore) -> JobResult:
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


def run_jobs(
    stage: str,
    fn: JobFn,
    specs: list[dict],
    rt: RuntimeParams,
    on_result: Callable[[dict, JobResult, bool], None] | None = None,
    inputs: InputStore | None = None,
) -> dict[str, JobResult]:
    """Run ``fn(spec, job_inputs)`` for every spec as Ray tasks; returns {spec id: its result}.

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
    results: dict[str, JobResult] = {}
    pending = []
    threads = rt.torch_threads
    for spec in specs:
        cached = read_cached(cache, spec_key(spec))
        if cached is not None and cached.machine.get("torch_threads", threads) != threads:
            cached = None  # computed with another thread count: other float sums
        if cached is not None:
            results[spec["id"]] = cached
            if on_result:
                on_result(spec, cached, True)
        else:
            pending.append(spec)
    stage_logger(__name__).info(f"{stage}: {len(results)} of {len(specs)} jobs from the job cache {cache}")
    if not pending:
        return results

    def with_checkpoints(spec: dict) -> dict:  # a path field: the cache key stays the spec's
        return {**spec, "checkpoint_dir": checkpoint_location(rt, stage, spec)}

    def finish(spec: dict, result: JobResult) -> None:
        write_cached(cache, spec_key(spec), result)
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
