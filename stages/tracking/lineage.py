"""Lineage of a stage run: the code (git commit, dirty flag), the stage's deps and params as
``dvc.lock`` records them, and the digests of the prepared tasks it read.

DVC writes ``dvc.lock`` only after a stage ends, so a running stage computes the same hashes
itself, with DVC's own hashing (``dvc_data``): md5 of a file, DVC's ``<md5>.dir`` hash of a
folder (honouring ``.dvcignore``). The params a stage declares in ``dvc.yaml`` are hashed as
sha256 of their canonical JSON (``dvc.lock`` stores their values), and the params file as a
whole as its md5. Nothing here talks to MLflow (``stages.tracking.runlog`` logs these).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dvc.fs import LocalFileSystem
from dvc.ignore import DvcIgnoreFilter
from dvc_data.hashfile.build import build
from dvc_data.hashfile.db import HashFileDB

from stages.config.common import PARAMS_ENV, read_params, resolve


def params_file(root: Path | None = None) -> Path:
    """The params file this process reads (``RECAST_PARAMS``, else ``<root>/params.yaml``)."""
    return Path(os.environ.get(PARAMS_ENV) or (root or resolve(".")) / "params.yaml")


def git_state(root: Path | None = None) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false"}``; empty strings outside a git work tree or
    before the first commit. Dirty means tracked or untracked (not ignored) changes other than
    what ``dvc repro`` itself writes: ``dvc.lock`` after each stage, and ``metrics/`` (the headline
    metrics in git, DVC's ``.gitignore`` of the stages' summaries)."""
    root = root or resolve(".")

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": "", "dirty": ""}
    status = git("status", "--porcelain", "--", ".", ":(exclude)dvc.lock", ":(exclude)metrics")
    return {"commit": head.stdout.strip(), "dirty": str(bool(status.stdout.strip())).lower()}


ABSENT = "absent"  # the lineage value of a dvc.yaml dep that does not exist in this work tree


def dvc_hash(path: Path, root: Path | None = None) -> str:
    """The hash ``dvc.lock`` records for ``path``: its md5, or ``<md5>.dir`` for a folder."""
    root = root or resolve(".")
    if not path.exists():
        raise FileNotFoundError(f"dvc dep {path} does not exist")
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="recast-dvc-odb-") as tmp:
        odb = HashFileDB(fs, tmp)  # dry run: the .dir object is computed, never stored
        _, _, obj = build(odb, str(path), fs, "md5", dry_run=True, ignore=DvcIgnoreFilter(fs, str(root)))
    return obj.hash_info.value


def stage_declaration(stage: str, root: Path | None = None) -> dict[str, Any]:
    """The stage's entry in ``dvc.yaml`` (cmd, deps, params, outs...)."""
    root = root or resolve(".")
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    if stage not in stages:
        raise KeyError(f"dvc.yaml has no stage '{stage}'; stages: {sorted(stages)}")
    return stages[stage]


def _params_values(keys: list[Any], data: dict[str, Any]) -> dict[str, Any]:
    """The values of the params a stage declares (``section`` or ``section.key``)."""
    out: dict[str, Any] = {}
    for key in keys:
        names = list(key) if isinstance(key, dict) else [key]  # {file: [keys]} form: keys of that file
        for name in names:
            value: Any = data
            for part in str(name).split("."):
                value = value.get(part) if isinstance(value, dict) else None
            out[str(name)] = value
    return out


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class StageLineage:
    """What a stage run is made of. ``deps`` maps each dvc.yaml dep to its dvc.lock hash."""

    stage: str
    commit: str
    dirty: str
    deps: dict[str, str]
    params: dict[str, Any]
    params_file: str
    params_file_md5: str

    @property
    def params_sha256(self) -> str:
        return sha256_json(self.params)

    @property
    def deps_sha256(self) -> str:
        """One digest over every dep hash (a column of the results tables)."""
        return sha256_json(self.deps)

    def tags(self) -> dict[str, str]:
        """MLflow tags: ``git.*``, ``dvc.dep.<path>``, ``dvc.params_sha256``, ``params.*`` and the
        ``mlflow.source.*`` tags that fill the runs table's Source column."""
        tags = {"git.commit": self.commit, "git.dirty": self.dirty, "dvc.stage": self.stage,
                "dvc.deps_sha256": self.deps_sha256, "dvc.params_sha256": self.params_sha256,
                "params.file": self.params_file, "params.file_md5": self.params_file_md5,
                "mlflow.source.type": "JOB", "mlflow.source.name": f"python -m stages.{self.stage}"}
        if self.commit:
            tags["mlflow.source.git.commit"] = self.commit
        tags.update({f"dvc.dep.{path}": h for path, h in self.deps.items()})
        return tags

    def columns(self) -> dict[str, str]:
        """The lineage columns of a stage's results table."""
        return {"git_commit": self.commit, "git_dirty": self.dirty, "deps_sha256": self.deps_sha256,
                "params_sha256": self.params_sha256, "params_file_md5": self.params_file_md5}


def stage_lineage(stage: str, root: Path | None = None, params_path: Path | None = None) -> StageLineage:
    """Compute the lineage of ``stage`` now, from the work tree (call it before writing outputs)."""
    root = root or resolve(".")
    # outside a DVC project (the stage called as a library function) there is nothing to declare
    decl = stage_declaration(stage, root) if (root / "dvc.yaml").exists() else {}
    # a side run (``--params other.yaml``) may read its inputs from elsewhere: a dvc.yaml dep that
    # is absent is recorded as such; each job's own input digests are tagged on its run anyway
    deps = {str(d): dvc_hash(root / str(d), root) if (root / str(d)).exists() else ABSENT for d in decl.get("deps", [])}
    path = params_path or params_file(root)
    path = path if path.is_absolute() else root / path
    git = git_state(root)
    values = _params_values(decl.get("params", []), read_params(path)) if path.exists() else {}
    return StageLineage(stage, git["commit"], git["dirty"], deps, values,
                        str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
                        file_md5(path) if path.exists() else "")


def manifest_sha256(task_dir: str | Path) -> str:
    """Full sha256 of a prepared task's ``manifest.json`` (which holds its files' digests)."""
    return hashlib.sha256((Path(task_dir) / "manifest.json").read_bytes()).hexdigest()


@dataclass(frozen=True)
class TaskData:
    """A prepared task as a dataset input: name, folder, manifest sha256."""

    name: str
    path: str
    sha256: str

    @classmethod
    def of(cls, name: str, task_dir: str | Path) -> TaskData:
        return cls(name, str(Path(task_dir).resolve()), manifest_sha256(Path(task_dir).resolve()))
