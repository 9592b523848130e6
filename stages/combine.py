"""Stage ``combine``: adapters alone and combined with RECAST (paper eq. 6), through the same
driver as ``tune`` (its training recipe, tasks and seeds come from the ``tune`` section)."""

from __future__ import annotations

from stages.config.cli import run_cli, stage_params
from stages.config.common import validate_section
from stages.config.params import CombineParams, RuntimeParams, TuneParams
from stages.jobs.tuning import run_tuning


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    tune = validate_section("tune", TuneParams, data)
    c = validate_section("combine", CombineParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    summary = run_tuning("combine", tune, c.methods, rt, c.out_dir, continual=False)
    for k, v in summary.items():
        print(f"{k:40s} avg test acc {v['avg_test_acc']:.4f}")


if __name__ == "__main__":
    run_cli(main)
