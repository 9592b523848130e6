"""The job cache: a finished job's result under ``<cache_dir>/<stage>/<key>.{json,safetensors}``.

The key (``spec_key``) hashes the job spec without its paths and the code that runs it. The
driver writes each result through temp-file + rename, under a per-entry file lock; the JSON
records the sha256 of the result's record (``JobResult.record``) and of the tensor file, and an
entry that does not match them (a flipped byte, a truncated file) is discarded with a warning,
so the job is computed again. A re-run of a killed stage finds its finished jobs here.
``store_tensors`` publishes a job's tensor file as a hard link to its cache file, so a stage
output and the job cache hold one copy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from recast.io import save_tensors, write_tensor_file
from stages.config.common import file_lock, resolve, resolve_shared, temp_path, write_json_atomic
from stages.config.params import RuntimeParams
from stages.jobs.result import JobResult

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


def _record_sha256(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _entry_lock(cache: Path, key: str):
    return file_lock(cache / f"{key}.lock")


def read_cached(cache: Path, key: str) -> JobResult | None:
    """A cached result whose digests match, else None (a bad entry is removed, with a warning)."""
    js, st = _cache_paths(cache, key)
    if not js.exists():
        return None
    with _entry_lock(cache, key):
        try:
            entry = json.loads(js.read_text())
            record, tensors_sha = entry["record"], entry["tensors_sha256"]
            if _record_sha256(record) != entry["record_sha256"]:
                raise ValueError("its record does not match its sha256")
            tensors = {}
            if tensors_sha is not None:
                if _file_sha256(st) != tensors_sha:
                    raise ValueError(f"{st.name} does not match its sha256")
                tensors = load_file(str(st))
            return JobResult.from_record(record, tensors)
        except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, truncated or edited
            warnings.warn(f"job cache entry {js} is corrupt ({type(err).__name__}: {err}); discarding it, "
                          "the job runs again", stacklevel=2)
            js.unlink(missing_ok=True)
            st.unlink(missing_ok=True)
            return None


def write_cached(cache: Path, key: str, result: JobResult) -> None:
    """Store ``result`` as the entry ``key`` of ``cache`` (tensors first, then the JSON naming their sha256)."""
    js, st = _cache_paths(cache, key)
    cache.mkdir(parents=True, exist_ok=True)
    with _entry_lock(cache, key):
        tensors_sha = None
        if result.tensors:
            tmp = temp_path(st)
            write_tensor_file(result.tensors, tmp)  # the same header as recast.io's files: publishable as a hard link
            tensors_sha = _file_sha256(tmp)
            os.replace(tmp, st)
        record = result.record()
        write_json_atomic(js, {"record": record, "record_sha256": _record_sha256(record),
                               "tensors_sha256": tensors_sha})
