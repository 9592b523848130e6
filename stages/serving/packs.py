"""Payload packs and the local payload cache of the served model (issue 31, item 3).

- A **pack** is one safetensors file holding the payloads of up to ``PACK_TASKS`` tasks, stacked
  (``write_pack``: per layer ``coefs.<layer>`` (tasks, K, n), the heads' rows concatenated; a
  payload that packed tasks cannot hold as ``<task>/<key>``); the header's ``recast_pack``
  metadata: per task its pinned registry URI, classes, bank sha256 and payload sha256, as in its
  payload's sidecar. ``stages.serving.build`` writes packs as artifacts of the version's run and
  names them in the model config (URI, sha256, bytes, tasks, head widths), so loading T tasks
  fetches ``ceil(T / PACK_TASKS)`` files (plus at most ``EXTRA_PACKS``), not T payloads. A build reuses the previous version's packs whose tasks are
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

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


PACKABLE_HEAD = ({"head.weight", "head.bias"}, set())  # head keys a packed task holds (recast.packed)


def packable(keys) -> bool:
    """Whether a payload's tensor names fit packed tasks: coefficients and a Linear head with a
    bias (or none), nothing else (per-task biases, norms, BatchNorm statistics and ``extra.``
    tensors are stored and loaded task by task)."""
    return {k for k in keys if not k.startswith("coefs.")} in PACKABLE_HEAD


def write_pack(entries: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]],
               path: Path) -> tuple[str, list[str], dict[str, int]]:
    """Write ``entries`` (task -> (payload tensors, pack meta)) as one pack file: (its sha256, the
    stacked tasks, their head widths).

    The packable tasks (``packable``, all with the same coefficient shapes) are stored stacked, in
    sorted order: per layer ``coefs.<layer>`` (tasks, K, n), the heads' rows one after another in
    ``head.weight`` / ``head.bias``: a load reads a few tensors, not thousands. Every other task's
    tensors are stored as ``<task>/<key>``. The header's ``recast_pack`` metadata: per task its
    pack meta, the stacked tasks in order and their head widths."""
    tasks = sorted(entries)
    shapes = None
    stacked, single = [], []
    for t in tasks:
        own = entries[t][0]
        mine = {k: tuple(v.shape) for k, v in own.items()}
        if packable(own) and (shapes is None or {k: v for k, v in mine.items() if k.startswith("coefs.")} == shapes) \
                and ("head.weight" not in own or len(mine["head.weight"]) == 2):
            shapes = shapes or {k: v for k, v in mine.items() if k.startswith("coefs.")}
            stacked.append(t)
        else:
            single.append(t)
    tensors: dict[str, torch.Tensor] = {}
    for key in sorted(shapes or {}):
        tensors[key] = torch.stack([torch.as_tensor(entries[t][0][key]) for t in stacked])
    heads = [t for t in stacked if "head.weight" in entries[t][0]]
    if heads:
        tensors["head.weight"] = torch.cat([torch.as_tensor(entries[t][0]["head.weight"]) for t in heads])
        tensors["head.bias"] = torch.cat([torch.as_tensor(entries[t][0]["head.bias"]) for t in heads])
    for t in single:
        tensors.update({f"{t}/{k}": torch.as_tensor(v) for k, v in entries[t][0].items()})
    widths = [int(entries[t][0]["head.weight"].shape[0]) if "head.weight" in entries[t][0] else 0 for t in stacked]
    meta = json.dumps({"tasks": {t: entries[t][1] for t in tasks}, "stacked": stacked, "widths": widths},
                      sort_keys=True, separators=(",", ":"))
    write_tensor_file(tensors, path, {PACK_META: meta})
    return sha256_hex(Path(path).read_bytes()), stacked, dict(zip(stacked, widths))


# safetensors dtype -> numpy dtype (payload numbers); others (BF16) are read as torch tensors
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_TORCH = {"BF16": torch.bfloat16}


def _array(buffer: bytearray, begin: int, name: str, spec: dict, what: str) -> Any:
    """The tensor ``name`` of a pack as a view of ``buffer`` (numpy; BF16 a torch view)."""
    kind, shape = spec["dtype"], tuple(spec["shape"])
    start, end = (begin + o for o in spec["data_offsets"])
    if kind not in _NUMPY and kind not in _TORCH:
        raise ServingError(f"{what}: tensor {name!r} of dtype {kind}, which payloads do not use")
    itemsize = np.dtype(_NUMPY[kind]).itemsize if kind in _NUMPY else torch.empty(0, dtype=_TORCH[kind]).element_size()
    count = int(np.prod(shape, dtype=np.int64))
    if end - start != itemsize * count or not 0 <= start <= end <= len(buffer):
        raise ServingError(f"{what}: tensor {name!r} has {end - start} bytes at {start}, not {list(shape)} {kind}")
    if kind in _NUMPY:
        return np.frombuffer(buffer, dtype=_NUMPY[kind], count=count, offset=start).reshape(shape)
    if not count:
        return torch.empty(shape, dtype=_TORCH[kind])
    return torch.frombuffer(buffer, dtype=_TORCH[kind], count=count, offset=start).view(shape)


def iter_pack(data: bytes, what: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(task, payload arrays, pack meta) of every task of a pack, one task at a time: the arrays
    are numpy views (of one writable copy of ``data``), the stacked tasks' rows of the stacked
    tensors. Nothing is made for all tasks at once: a load that made all of thousands of tasks'
    small tensors left megabytes of heap behind. An unreadable pack is a ServingError."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        meta = json.loads(header.pop("__metadata__")[PACK_META])
        tasks, stacked, widths = meta["tasks"], meta["stacked"], meta["widths"]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ServingError(f"{what}: not a readable payload pack ({type(err).__name__}: {err})") from None
    buffer = bytearray(data)
    blocks = {name: _array(buffer, 8 + size, name, spec, what) for name, spec in header.items() if "/" not in name}
    own: dict[str, dict[str, dict]] = {}
    for name, spec in header.items():
        if "/" in name:
            task, _, key = name.partition("/")
            if task not in tasks or task in stacked:
                raise ServingError(f"{what}: tensor {name!r} of a task the pack's metadata does not list alone")
            own.setdefault(task, {})[key] = spec
    rows = sum(widths)
    coefs = [k for k in blocks if k.startswith("coefs.")]
    if (len(widths) != len(stacked) or any(len(blocks[k]) != len(stacked) for k in coefs)
            or ("head.weight" in blocks) != bool(rows) or (rows and (len(blocks["head.weight"]) != rows
                                                                   or len(blocks.get("head.bias", ())) != rows))
            or set(stacked) | set(own) != set(tasks) or set(blocks) - {*coefs, "head.weight", "head.bias"}):
        raise ServingError(f"{what}: the pack's stacked tensors do not match its metadata")
    start = 0
    for j, task in enumerate(stacked):
        arrays = {k: blocks[k][j] for k in coefs}
        if widths[j]:
            arrays["head.weight"] = blocks["head.weight"][start:start + widths[j]]
            arrays["head.bias"] = blocks["head.bias"][start:start + widths[j]]
            start += widths[j]
        yield task, arrays, tasks[task]
    for task, specs in own.items():
        yield task, {k: _array(buffer, 8 + size, f"{task}/{k}", spec, what) for k, spec in specs.items()}, tasks[task]


def read_pack(data: bytes, what: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """A pack's bytes -> task -> (payload arrays, pack meta), every task at once (a build's
    re-packing; a load reads task by task, ``iter_pack``)."""
    return {t: (arrays, meta) for t, arrays, meta in iter_pack(data, what)}


def as_tensors(arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A payload's arrays as tensors sharing their memory."""
    return {k: torch.as_tensor(v) for k, v in arrays.items()}


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
    arrays, meta = entry
    if meta.get("source") != source:
        raise ServingError(f"{where}: task {task!r} holds the payload {meta.get('source')!r}, the model config "
                           f"pins {source!r}")
    if meta.get("bank_sha256") != served_sha:
        raise BankMismatchError(task, str(meta.get("bank_sha256")), served_sha, source)
    if tensors_sha256(as_tensors(arrays)) != meta.get("payload_sha256"):  # one task's tensors at a time
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
