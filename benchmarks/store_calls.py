"""Counting the MLflow store round trips of a block of code (issue 31, item 3: a served model's
load must not make one per task).

``count_store_calls()`` patches, for the block, every public method of the embedded store's two
sqlalchemy stores (tracking and registry: each call is one query round trip, a REST call on a
tracking server), the local artifact repository's downloads and listings (``artifact_calls``)
and the files they copy (``artifact_files``: MLflow copies them in worker threads; a download
without a destination reads the local store in place and copies none), and MLflow's
``http_request`` (every call to a remote tracking or artifact server). Only the outermost store
call of a thread counts (a store method that calls another is one round trip).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter
from collections.abc import Iterator


def _targets() -> list[tuple[type | object, str, str]]:
    """(owner, attribute, counter key) of everything counted."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from mlflow.utils import rest_utils

    out: list[tuple[type | object, str, str]] = []
    for cls, key in ((RegistryStore, "registry"), (TrackingStore, "tracking")):
        for name, value in vars(cls).items():
            if not name.startswith("_") and callable(value) and not isinstance(value, type):
                out.append((cls, name, key))
    out += [(LocalArtifactRepository, "download_artifacts", "artifact_calls"),
            (LocalArtifactRepository, "list_artifacts", "artifact_calls"),
            (LocalArtifactRepository, "_download_file", "artifact_files"),
            (rest_utils, "http_request", "http")]
    return out


@contextlib.contextmanager
def count_store_calls() -> Iterator[Counter]:
    """A Counter of store calls made inside the block: ``registry``, ``tracking``,
    ``artifact_calls``, ``artifact_files``, ``http``; ``total`` is their sum (filled in at exit)."""
    counts: Counter = Counter()
    depth = threading.local()
    lock = threading.Lock()
    saved = []

    def wrap(fn, key):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            level = getattr(depth, "n", 0)
            if level == 0:
                with lock:
                    counts[key] += 1
            depth.n = level + 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth.n = level
        return counted

    for owner, name, key in _targets():
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if isinstance(original, (staticmethod, classmethod)):
            continue
        saved.append((owner, name, original))
        setattr(owner, name, wrap(original, key))
    try:
        yield counts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
        counts["total"] = sum(v for k, v in counts.items() if k != "total")
