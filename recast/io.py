"""Files: template banks and per-task payloads as safetensors + a JSON sidecar.

``<path>.safetensors`` holds the tensors, ``<path>.json`` the metadata: the RecastConfig, the
plan's bank shapes and the banks' sha256 (over names, shapes, dtypes and bytes, so it does
not depend on file layout). Loading a payload against banks with another sha256 is a
ValueError. Nothing here uses pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recast.atomic import temp_path, write_atomic
from recast.model import RecastModel

FORMAT_VERSION = 1
TENSOR_FILE_METADATA = {"format": "recast", "version": str(FORMAT_VERSION)}  # header of every tensor file


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # its buffer: no copy
    return h.hexdigest()


def bank_tensors(rc: RecastModel) -> dict[str, torch.Tensor]:
    """The templates of every bank, keyed by bank key."""
    return {key: bank.templates.detach() for key, bank in rc.banks.items()}


def bank_sha256(rc: RecastModel) -> str:
    return tensors_sha256(bank_tensors(rc))


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_tensors(tensors: dict[str, torch.Tensor], meta: dict, path: str | os.PathLike) -> Path:
    """Write ``<path>.safetensors`` + ``<path>.json`` atomically (temp names, then rename)."""
    st, js = _paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    tmp_st = temp_path(st)
    try:
        write_tensor_file(tensors, tmp_st)
        os.replace(tmp_st, st)
    finally:
        tmp_st.unlink(missing_ok=True)
    write_atomic(js, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return st


def write_tensor_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """``path`` as safetensors with the project's header metadata (and ``metadata``),
    byte-reproducible: the same tensors always give the same bytes (no temp file: callers write
    to a temp name and rename)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={**(metadata or {}), **TENSOR_FILE_METADATA})
    _sort_metadata(Path(path))


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header's ``__metadata__`` in sorted key order, in place (safetensors
    writes it in hash order, so identical tensors gave different bytes). Same length: the
    tensor offsets do not move."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        fixed = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        assert len(fixed) <= size, "safetensors header grew"
        fh.seek(8)
        fh.write(fixed.ljust(size, b" "))


def _config_dict(rc: RecastModel) -> dict:
    cfg = asdict(rc.config)
    cfg["targets"], cfg["exclude"] = list(cfg["targets"]), list(cfg["exclude"])
    return cfg


def save_banks(rc: RecastModel, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the banks (and the shared, non-templated weights are not included)."""
    tensors = bank_tensors(rc)
    meta = {
        "kind": "recast-banks", "version": FORMAT_VERSION, "config": _config_dict(rc),
        "banks": {b.key: {"shape": list(b.shape), "templates": b.templates, "modules": list(b.modules)} for b in rc.plan.banks},
        "bank_sha256": tensors_sha256(tensors), **(extra or {}),
    }
    return save_tensors(tensors, meta, path)


def _load_tensors(st: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an unreadable file is a ValueError naming it."""
    try:
        return load_file(str(st))
    except SafetensorError as e:
        raise ValueError(f"{st}: not a readable safetensors file ({e})") from e


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a bank or payload file."""
    _, js = _paths(path)
    if not js.exists():
        raise FileNotFoundError(f"missing metadata sidecar {js}")
    return json.loads(js.read_text())


def load_banks(rc: RecastModel, path: str | os.PathLike) -> dict:
    """Load banks into ``rc``; shapes and sha256 are checked. Returns the metadata."""
    st, _ = _paths(path)
    meta = read_meta(path)
    tensors = _load_tensors(st)
    if tensors_sha256(tensors) != meta.get("bank_sha256"):
        raise ValueError(f"{st}: content does not match the sha256 in its sidecar (corrupt or edited file)")
    if set(tensors) != set(rc.banks):
        raise ValueError(f"{st}: banks {sorted(tensors)[:4]}... do not match this model's {sorted(rc.banks)[:4]}...")
    with torch.no_grad():
        for key, t in tensors.items():
            if t.shape != rc.banks[key].templates.shape:
                raise ValueError(f"{st}: bank '{key}' has shape {tuple(t.shape)}, model expects {tuple(rc.banks[key].templates.shape)}")
            rc.banks[key].templates.copy_(t)
    return meta


def save_payload(rc: RecastModel, task: str, path: str | os.PathLike,
                 extra_tensors: dict[str, torch.Tensor] | None = None, extra: dict | None = None) -> Path:
    """Write one task's payload: ``rc.task_tensors(task)`` (coefficients, head and what the task
    owns: biases, norms, BatchNorm statistics) + ``extra_tensors`` (e.g. adapter tensors)."""
    tensors = rc.task_tensors(task)
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    head = rc.task_heads.heads[task] if rc.task_heads is not None and task in rc.task_heads.heads else None
    packed_head = rc.packed is not None and task in rc.packed and "head.weight" in tensors
    meta = {
        "kind": "recast-payload", "version": FORMAT_VERSION, "task": task,
        "num_classes": head.out_features if head is not None else rc.num_classes(task) if packed_head else None,
        "config": _config_dict(rc), "bank_sha256": bank_sha256(rc),
        "payload_sha256": tensors_sha256(tensors),
        "numel": int(sum(t.numel() for t in tensors.values())),
        "bytes": int(sum(t.numel() * t.element_size() for t in tensors.values())), **(extra or {}),
    }
    return save_tensors(tensors, meta, path)


def load_payload(rc: RecastModel, path: str | os.PathLike, task: str | None = None) -> dict[str, torch.Tensor]:
    """Load a payload onto ``rc`` as ``task`` (default: its own name). Returns its extra tensors.

    Raises:
        ValueError: the payload was made against different banks, its file is corrupt or
            unreadable, or its tensors do not fit ``rc`` (see ``RecastModel.load_task_tensors``).
    """
    st, _ = _paths(path)
    meta = read_meta(path)
    if meta.get("kind") != "recast-payload":
        raise ValueError(f"{st}: not a RECAST payload (kind={meta.get('kind')!r})")
    mine = bank_sha256(rc)
    if meta["bank_sha256"] != mine:
        raise ValueError(
            f"{st}: payload of task '{meta['task']}' was trained against banks {meta['bank_sha256'][:12]}, "
            f"this model's banks are {mine[:12]}; load the matching banks first"
        )
    tensors = _load_tensors(st)
    if tensors_sha256(tensors) != meta["payload_sha256"]:
        raise ValueError(f"{st}: content does not match the sha256 in its sidecar (corrupt or edited file)")
    extras = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    core = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    rc.load_task_tensors(task or meta["task"], core, num_classes=meta.get("num_classes"))
    return extras
