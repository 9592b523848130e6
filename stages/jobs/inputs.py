"""Inputs of distributed jobs: they travel with the job, never through the driver's disk.

A job reads *bundles*: named files identified by a content digest. A prepared task
(``manifest.json`` + ``{train,val,test}.parquet``), a pretrained backbone (``meta.json`` +
``state.safetensors``, from ``<pretrain_dir>/<arch>.*``), the RECAST form of an arch
(``recast.json`` + ``banks.safetensors`` + ``base.safetensors``, from ``<mimic_dir>/<arch>/``)
or one file (a timm checkpoint). The digest hashes the bundle's small JSON files, which record
the sha256 of the large ones (a task's manifest lists its Parquet files' digests; the backbone and
bank sidecars their tensors'), or the file's bytes for a single file. A bundle's key
``<kind>-<digest>`` is what a job spec carries, so a job's cache key follows the content, not a
path: a copied project reuses its cache.

Transport: by default the driver puts each bundle into Ray's object store once (``ray.put``)
and passes its ``ObjectRef`` to every job that needs it. With ``runtime.storage`` (an
``s3://``, ``gs://`` or ``file://`` URI every node can read, through ``pyarrow.fs``) the driver
uploads each bundle once to ``<storage>/<key>/<file>`` (skipped when already there) and jobs
read it from there. On the job side Parquet splits are checked against their manifest's sha256.

Driver side (a stage, or a Ray Tune driver)::

    store = InputStore(rt.storage)
    spec["inputs"] = {"task": store.add(task_bundle(data_dir / task)),
                      "backbone": store.add(backbone_bundle(pretrain_dir, arch)),
                      "banks": store.add(banks_bundle(mimic_dir, arch))}   # role -> key
    refs = store.refs(specs)          # {key: ObjectRef | URI}: each bundle put once per store

Job side (inside the Ray task or Tune trial; ``refs`` passed as an argument)::

    inputs = JobInputs.fetch(spec["inputs"], refs)
    data = inputs.task("task")                  # TaskData: .manifest, .loader(split, ...)
    backbone = inputs.backbone("backbone", banks="banks")

``store.local(spec["inputs"])`` builds the same ``JobInputs`` from the driver's files, without
Ray (tests, benchmarks, inline runs). ``stages.jobs.fanout.run_jobs(..., inputs=store)`` does all of
the above for the stages: their job functions take ``(spec, inputs)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import load as load_safetensors

from recast.atomic import write_atomic_fs
from recast.data import BatchLoader, DataError, TaskManifest
from recast.data.manifest import MANIFEST_NAME, SPLITS
from recast.data.storage import read_split_bytes
from recast.recipes import Backbone
from stages.jobs.backbones import backbone_from

Payload = dict[str, np.ndarray]  # file name -> uint8 bytes of the file


@dataclass(frozen=True)
class Bundle:
    """Files of one input on the driver's disk: ``files`` maps the bundle's file names onto paths;
    ``digest`` hashes ``identity`` (the names of the files whose bytes define the content)."""

    kind: str
    files: dict[str, Path]
    identity: tuple[str, ...]
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        missing = [str(p) for p in self.files.values() if not p.is_file()]
        if missing:
            raise DataError(missing[0], f"input file of a {self.kind} bundle not found (run the stage that writes it)")
        object.__setattr__(self, "digest", _digest({n: self.files[n].read_bytes() for n in self.identity}))

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.digest}"

    def read(self) -> Payload:
        return {name: np.fromfile(path, dtype=np.uint8) for name, path in self.files.items()}


def _digest(files: dict[str, bytes | np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{len(files[name])}\0".encode())
        h.update(files[name])
    return h.hexdigest()[:24]


def task_bundle(task_dir: Path) -> Bundle:
    """A prepared task: ``manifest.json`` and every file it lists."""
    task_dir = Path(task_dir)
    path = task_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(path, "manifest not found (run the prepare stage first)")
    listed = json.loads(path.read_text()).get("files", {})
    return Bundle("task", {MANIFEST_NAME: path, **{n: task_dir / n for n in listed}}, (MANIFEST_NAME,))


def backbone_bundle(pretrain_dir: Path, arch: str) -> Bundle:
    """A pretrained backbone: ``<pretrain_dir>/<arch>.json`` (with the state's sha256) + safetensors."""
    d = Path(pretrain_dir)
    return Bundle("backbone", {"meta.json": d / f"{arch}.json", "state.safetensors": d / f"{arch}.safetensors"},
                  ("meta.json",))


def banks_bundle(mimic_dir: Path, arch: str) -> Bundle:
    """The RECAST form of an arch: ``recast.json``, banks and base coefficients (+ their sidecars)."""
    d = Path(mimic_dir) / arch
    files = {"recast.json": d / "recast.json", "banks.safetensors": d / "banks.safetensors",
             "banks.json": d / "banks.json", "base.safetensors": d / "base.safetensors", "base.json": d / "base.json"}
    return Bundle("banks", files, ("recast.json", "banks.json", "base.json"))


def file_bundle(path: Path) -> Bundle:
    """One file (e.g. a checkpoint), named ``file<suffix>``, its digest over its bytes."""
    path = Path(path)
    name = f"file{path.suffix}"
    return Bundle("file", {name: path}, (name,))


class InputStore:
    """Driver side: the bundles of a stage run, each moved to the jobs once.

    Args:
        storage: ``None`` for Ray's object store, else a URI every node can read
            (``s3://bucket/prefix``, ``gs://...``, ``file:///shared/path``).
    """

    def __init__(self, storage: str | None = None) -> None:
        self.storage = storage
        self.bundles: dict[str, Bundle] = {}
        self._refs: dict[str, Any] = {}
        self._session: str | None = None

    def add(self, bundle: Bundle) -> str:
        """Register ``bundle``; returns its key (what a spec's ``inputs`` maps a role onto)."""
        self.bundles.setdefault(bundle.key, bundle)
        return bundle.key

    def refs(self, specs: list[dict]) -> dict[str, Any]:
        """``{key: ObjectRef or URI}`` for every input of ``specs``; each bundle is put (or uploaded)
        at most once per store. Needs Ray initialised unless ``storage`` is set."""
        keys = sorted({k for s in specs for k in s.get("inputs", {}).values()})
        unknown = [k for k in keys if k not in self.bundles]
        if unknown:
            raise KeyError(f"inputs {unknown} were never added to this InputStore")
        if not self.storage and keys:
            import ray  # noqa: PLC0415 - Ray is imported only by the stages that fan out

            session = ray.get_runtime_context().get_job_id()
            if session != self._session:  # object refs die with the Ray session that made them
                self._refs, self._session = {}, session
        for key in keys:
            if key not in self._refs:
                self._refs[key] = self._upload(key) if self.storage else self._put(key)
        return {k: self._refs[k] for k in keys}

    def _put(self, key: str) -> Any:
        import ray  # noqa: PLC0415 - see refs()

        return ray.put(self.bundles[key].read())

    def _upload(self, key: str) -> str:
        fs, root = pafs.FileSystem.from_uri(self.storage)
        base = f"{root.rstrip('/')}/{key}"
        fs.create_dir(base, recursive=True)
        for name, path in self.bundles[key].files.items():
            dest = f"{base}/{name}"
            info = fs.get_file_info(dest)
            if info.type == pafs.FileType.File and info.size == path.stat().st_size:
                continue  # content-addressed: same key, same bytes
            write_atomic_fs(fs, dest, path.read_bytes())
        return f"{self.storage.rstrip('/')}/{key}"

    def local(self, roles: dict[str, str]) -> JobInputs:
        """The ``JobInputs`` of a spec's ``inputs``, read from the driver's files (no Ray)."""
        return JobInputs(roles, {key: self.bundles[key].read() for key in set(roles.values())})


class JobInputs:
    """Job side: the bundles of one job by role (``spec["inputs"]``: role -> key)."""

    def __init__(self, roles: dict[str, str], payloads: dict[str, Payload]) -> None:
        self.roles, self.payloads = dict(roles), payloads
        for key in set(self.roles.values()):
            kind, _, digest = key.partition("-")
            got = self.payloads[key]
            identity = {n: got[n] for n in _IDENTITY[kind] if n in got} if kind != "file" else got
            if _digest(identity) != digest:
                raise DataError(key, f"received bundle has digest {_digest(identity)}, not {digest}")

    @classmethod
    def fetch(cls, roles: dict[str, str], refs: dict[str, Any]) -> JobInputs:
        """Resolve ``refs`` (from ``InputStore.refs``): ``ray.get`` object refs, read URIs."""
        keys = sorted(set(roles.values()))
        missing = [k for k in keys if k not in refs]
        if missing:
            raise KeyError(f"no ref passed for inputs {missing}")
        payloads = {k: _read_uri(refs[k]) for k in keys if isinstance(refs[k], str)}
        in_store = [k for k in keys if k not in payloads]
        if in_store:
            import ray  # noqa: PLC0415 - only jobs whose inputs are in the object store need Ray here

            payloads.update(zip(in_store, ray.get([refs[k] for k in in_store]), strict=True))
        return cls(roles, payloads)

    def files(self, role: str) -> Payload:
        if role not in self.roles:
            raise KeyError(f"job has no input {role!r}; it has {sorted(self.roles)}")
        return self.payloads[self.roles[role]]

    def task(self, role: str = "task") -> TaskData:
        """The prepared task of ``role``."""
        files = self.files(role)
        manifest = TaskManifest.from_dict(json.loads(files[MANIFEST_NAME].tobytes()), source=self.roles[role])
        return TaskData(manifest, {s: files[f"{s}.parquet"] for s in SPLITS if f"{s}.parquet" in files})

    def backbone(self, role: str = "backbone", banks: str | None = None) -> Backbone:
        """The Backbone of ``role``, with its RECAST form from the ``banks`` role when given."""
        files = self.files(role)
        meta = json.loads(files["meta.json"].tobytes())
        state = load_safetensors(files["state.safetensors"].tobytes())
        if banks is None:
            return backbone_from(meta, state)
        b = self.files(banks)
        return backbone_from(meta, state, json.loads(b["recast.json"].tobytes()),
                             load_safetensors(b["banks.safetensors"].tobytes()),
                             load_safetensors(b["base.safetensors"].tobytes()))

    def file(self, role: str) -> tuple[str, bytes]:
        """(name, bytes) of a single-file input."""
        ((name, data),) = self.files(role).items()
        return name, data.tobytes()


_IDENTITY = {"task": (MANIFEST_NAME,), "backbone": ("meta.json",), "banks": ("recast.json", "banks.json", "base.json")}


def _read_uri(uri: str) -> Payload:
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(root))
    files = {}
    for info in infos:
        if info.type == pafs.FileType.File and not info.base_name.endswith(".tmp"):
            with fs.open_input_file(info.path) as fh:
                files[info.base_name] = np.frombuffer(fh.read(), dtype=np.uint8)
    if not files:
        raise DataError(uri, "no input files at this URI (is runtime.storage readable from this node?)")
    return files


class TaskData:
    """A prepared task in memory: its manifest and the Parquet bytes of its splits."""

    def __init__(self, manifest: TaskManifest, splits: dict[str, np.ndarray]) -> None:
        self.manifest, self._raw = manifest, splits
        self._decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def split(self, split: str) -> tuple[torch.Tensor | list[bytes], torch.Tensor]:
        """The split as stored (uint8 images (N, C, H, W), or JPEG bytes per row), int64 labels (N,);
        the bytes are checked against the manifest."""
        if split not in self._decoded:
            if split not in self._raw:
                raise DataError(f"{self.manifest.name}/{split}.parquet", "split not in this task's input")
            self._decoded[split] = read_split_bytes(self.manifest, split, self._raw[split])
        return self._decoded[split]

    def loader(self, split: str, batch_size: int, image_size: int, train: bool, seed: int,
               limit: int | None = None, device: str = "cpu") -> BatchLoader:
        """``BatchLoader.from_split`` over one split (arguments as ``BatchLoader``'s)."""
        images, labels = self.split(split)
        return BatchLoader.from_split(self.manifest, images, labels, split, batch_size, image_size, train=train,
                                      seed=seed, limit=limit, device=device)
