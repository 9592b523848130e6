"""Stage ``combine``: adapters alone and combined with RECAST (paper eq. 6), through the same
fan-out as ``tune`` (its training recipe, tasks and seeds come from the ``tune`` section)."""

from __future__ import annotations

from stages.common import stage_params, validate_section
from stages.tune import CombineParams, TuneParams, run


def main(argv: list[str] | None = None) -> None:
    from stages.runtime import RuntimeParams

    data = stage_params(argv, __doc__)
    tune = validate_section("tune", TuneParams, data)
    c = validate_section("combine", CombineParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    summary = run("combine", tune, c.methods, rt, c.out_dir, continual=False)
    for k, v in summary.items():
        print(f"{k:40s} avg test acc {v['avg_test_acc']:.4f}")


if __name__ == "__main__":
    # Run from the importable module, not __main__, so Ray pickles job functions by reference.
    from stages.combine import main as _main

    _main()
