"""Payload packs and the local payload cache of the served model (issue 31, item 3).

- A **pack** is one safetensors file holding the payloads of up to ``PACK_TASKS`` tasks (tensor
  ``<task>/<key>``; the header's ``recast_pack`` metadata: per task its pinned registry URI,
  classes, bank sha256 and payload sha256, as in its payload's sidecar). ``stages.serving.build``
  writes packs as artifacts of the version's run and names them in the model config (URI, sha256,
  bytes, tasks), so loading T tasks fetches ``ceil(T / PACK_TASKS)`` files (plus at most
  ``EXTRA_PACKS``), not T payloads. A build reuses the previous version's packs whose tasks are
  all served at the same pinned versions: a new task is fetched once, at its build, into a new
  pack; packs below ``PACK_TASKS`` tasks are merged when there are more than ``EXTRA_PACKS`` extra.
- The **cache** (``PayloadCache``; ``$RECAST_PAYLOAD_CACHE``, default
  ``~/.cache/recast/payloads``) keeps every fetched pack under its sha256. A read verifies the
  entry's digest (a corrupt entry is dropped and fetched again, never served), a fetch is verified
  before it is written (temp name + rename), and a per-digest file lock makes concurrent replicas
  on one machine fetch a pack once. Adding one task to a served version therefore makes a replica
  that served the previous version fetch one small pack: the new task's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from recast.atomic import write_atomic
from recast.io import tensors_sha256, write_tensor_file
from stages.serving.errors import BankMismatchError, ServingError

log = logging.getLogger(__name__)
PACK_TASKS = 256  # tasks per pack a build writes
EXTRA_PACKS = 4  # packs a version may reference beyond ceil(T / PACK_TASKS) before its small ones are merged
CACHE_ENV = "RECAST_PAYLOAD_CACHE"
PACK_META = "recast_pack"
_SHA = re.compile(r"^[0-9a-f]{64}$")


class PayloadDigestError(ServingError):
    """Fetched bytes whose sha256 is not the one the model config records (never served)."""

    def __init__(self, what: str, want: str, got: str):
        self.what, self.want, self.got = what, want, got
        super().__init__(f"{what}: sha256 {got[:12]} of the fetched file, the model config records {want[:12]}: "
                         "the store's copy changed after the build; rebuild the served model")

    def __reduce__(self):
        return type(self), (self.what, self.want, self.got)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_cache_dir() -> Path:
    """``$RECAST_PAYLOAD_CACHE``, else ``$XDG_CACHE_HOME/recast/payloads`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recast" / "payloads"


class PayloadCache:
    """Content-addressed local files (see the module docstring); ``hits``, ``fetches`` and
    ``corrupt`` count what this instance did."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = self.fetches = self.corrupt = 0

    def path(self, sha: str) -> Path:
        if not _SHA.match(sha):
            raise ServingError(f"{sha!r} is not a sha256 (64 lowercase hex digits)")
        return self.root / sha[:2] / f"{sha}.safetensors"

    def read(self, sha: str, fetch: Callable[[Path], str | os.PathLike], what: str) -> bytes:
        """The bytes whose sha256 is ``sha``: the cache entry when its digest matches, else
        ``fetch(directory)`` (returns the fetched file's path), verified, then cached. The bytes
        returned are the verified bytes themselves (no second read)."""
        path = self.path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock", timeout=600):
            if path.exists():
                data = path.read_bytes()
                if sha256_hex(data) == sha:
                    self.hits += 1
                    return data
                self.corrupt += 1
                log.warning("payload cache entry %s does not match its sha256: dropped, fetching %s again", path, what)
                path.unlink()
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
                data = Path(fetch(Path(tmp))).read_bytes()
            self.fetches += 1
            got = sha256_hex(data)
            if got != sha:
                raise PayloadDigestError(what, sha, got)
            write_atomic(path, data)
            return data


def write_pack(entries: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]], path: Path) -> str:
    """Write ``entries`` (task -> (payload tensors, pack meta)) as one pack file; its sha256."""
    tensors = {f"{task}/{key}": value for task, (own, _) in sorted(entries.items()) for key, value in own.items()}
    meta = json.dumps({task: m for task, (_, m) in sorted(entries.items())}, sort_keys=True, separators=(",", ":"))
    write_tensor_file(tensors, path, {PACK_META: meta})
    return sha256_hex(Path(path).read_bytes())


def read_pack(data: bytes, what: str) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """A pack's bytes -> task -> (payload tensors, pack meta); a ServingError names an unreadable pack."""
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + size])["__metadata__"][PACK_META])
        flat = load_safetensors(data)
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise ServingError(f"{what}: not a readable payload pack ({err})") from None
    out: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {t: ({}, m) for t, m in meta.items()}
    for name, value in flat.items():
        task, _, key = name.partition("/")
        if task not in out:
            raise ServingError(f"{what}: tensor {name!r} of a task the pack's metadata does not list")
        out[task][0][key] = value
    return out


def pack_entry(task: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str,
               served_sha: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One payload (its tensors and sidecar) checked for a pack: made on ``served_sha``
    (``BankMismatchError``), its tensors the ones its sidecar's sha256 names."""
    if meta.get("kind") != "recast-payload":
        raise ServingError(f"{source}: not a RECAST payload (kind={meta.get('kind')!r})")
    if meta.get("bank_sha256") != served_sha:
        raise BankMismatchError(task, str(meta.get("bank_sha256")), served_sha, source)
    if tensors_sha256(tensors) != meta.get("payload_sha256"):
        raise ServingError(f"{source}: payload of task {task!r} does not match the sha256 of its sidecar")
    return tensors, {"source": source, "num_classes": meta.get("num_classes"), "bank_sha256": meta["bank_sha256"],
                     "payload_sha256": meta["payload_sha256"]}


def check_entry(task: str, entry: tuple[dict[str, torch.Tensor], dict[str, Any]], source: str, served_sha: str,
                where: str) -> None:
    """A pack's entry of ``task`` before it is served: the pinned payload the config names, made
    on the served banks, its tensors those of the payload's sha256."""
    tensors, meta = entry
    if meta.get("source") != source:
        raise ServingError(f"{where}: task {task!r} holds the payload {meta.get('source')!r}, the model config "
                           f"pins {source!r}")
    if meta.get("bank_sha256") != served_sha:
        raise BankMismatchError(task, str(meta.get("bank_sha256")), served_sha, source)
    if tensors_sha256(tensors) != meta.get("payload_sha256"):
        raise ServingError(f"{where}: task {task!r} does not match its payload's sha256")


def plan_packs(pinned: dict[str, str], previous: dict[str, Any] | None, pack_tasks: int = PACK_TASKS,
               extra: int = EXTRA_PACKS) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Which packs of the previous version's config (``previous``; None: none) a version serving
    ``pinned`` (task -> pinned URI) reuses: (kept packs, packs to open for their tasks, tasks to
    fetch from the registry). A pack is kept when every task in it is served at the same pinned
    URI; the smallest kept packs are opened (their tasks re-packed) while the version would
    reference more than ``ceil(T / pack_tasks) + extra`` packs."""
    old = (previous or {}).get("payloads", {})
    packs = list((previous or {}).get("packs", []))
    keep = [p for p in packs if all(t in pinned and old.get(t) == pinned[t] for t in p["tasks"])]
    covered = {t for p in keep for t in p["tasks"]}
    opened: list[dict[str, Any]] = []
    leftover = [t for t in pinned if t not in covered]
    bound = -(-len(pinned) // pack_tasks) + extra
    keep.sort(key=lambda p: len(p["tasks"]), reverse=True)
    while keep and len(keep) + -(-len(leftover) // pack_tasks) > bound and len(keep[-1]["tasks"]) < pack_tasks:
        pack = keep.pop()
        opened.append(pack)
        leftover += pack["tasks"]
    from_packs = {t for p in opened for t in p["tasks"]}
    # tasks of dropped packs still served at the same version are read from those packs too
    for p in packs:
        if p not in keep and p not in opened and any(t in pinned and old.get(t) == pinned[t] for t in p["tasks"]):
            opened.append(p)
            from_packs |= {t for t in p["tasks"] if t in pinned and old.get(t) == pinned[t]}
    fetch = [t for t in pinned if t not in covered and t not in from_packs]
    return keep, opened, fetch
