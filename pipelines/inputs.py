"""Trial inputs through the Ray object store: trials never read the driver's disk.

The driver reads every input directory its trials name (prepared tasks, the pretrained
backbone's files, the mimic stage's banks) once, puts each one into the object store as a
``{file name: bytes}`` dict (``ship_inputs``), and hands the refs to the trials
(``tune.with_parameters``). A trial calls ``fetch_inputs``: it writes the directories it needs
under a local temporary directory of its own node and returns its spec with those local paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

# The spec fields that name driver paths: one directory, or a {task: directory} dict.
DIR_FIELDS = ("task_dir", "pretrain_dir", "mimic_dir")
DIRS_FIELDS = ("task_dirs",)


def _dir_files(path: Path, arch: str, field: str) -> dict[str, bytes]:
    """The files of one input directory a trial of ``arch`` reads."""
    if field == "pretrain_dir":  # <arch>.safetensors and <arch>.json only, not every arch's weights
        files = sorted(path.glob(f"{arch}.*"))
    elif field == "mimic_dir":
        files = sorted(p for p in (path / arch).rglob("*") if p.is_file())
    else:
        files = sorted(p for p in path.iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(f"{field}: no input files for arch '{arch}' under {path}")
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in files}


def _needed(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, driver path) of every input directory ``spec`` names."""
    out = [(f, spec[f]) for f in DIR_FIELDS if spec.get(f)]
    for f in DIRS_FIELDS:
        out += [("task_dir", d) for d in (spec.get(f) or {}).values()]
    if spec.get("mimic_dir") and not spec.get("bank_sha"):  # a trial that does not use the banks
        out = [(f, d) for f, d in out if f != "mimic_dir"]
    return out


def _key(field: str, path: str, arch: str) -> str:
    return f"{field}:{arch}:{path}" if field in ("pretrain_dir", "mimic_dir") else f"{field}:{path}"


def ship_inputs(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Driver: every input directory of ``specs`` as an object ref, keyed for ``fetch_inputs``."""
    refs: dict[str, Any] = {}
    for spec in specs:
        for field, path in _needed(spec):
            key = _key(field, path, spec["arch"])
            if key not in refs:
                refs[key] = ray.put(_dir_files(Path(path), spec["arch"], field))
    return refs


def fetch_inputs(spec: dict[str, Any], refs: dict[str, Any], root: Path) -> dict[str, Any]:
    """Trial: write the spec's input directories under ``root``; the spec with local paths."""
    local = dict(spec)
    written: dict[str, str] = {}
    for field, path in _needed(spec):
        key = _key(field, path, spec["arch"])
        if key not in written:
            target = root / f"in{len(written)}"
            for name, data in ray.get(refs[key]).items():
                dest = target / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            written[key] = str(target)
    for field in DIR_FIELDS:
        if spec.get(field):
            key = _key(field, spec[field], spec["arch"])
            local[field] = written.get(key, "")  # "" : the trial does not read it (no banks needed)
    for field in DIRS_FIELDS:
        if spec.get(field):
            local[field] = {t: written[_key("task_dir", d, spec["arch"])] for t, d in spec[field].items()}
    return local
