"""Stage ``tune``: every method of ``tune.methods`` on every task and seed, and the sequential
continual-learning baselines of ``tune.continual``, as Ray jobs (``stages.jobs.tuning``).

Each per-task job writes ``outputs/tune/payloads/<arch>/<method>/<task>-s<seed>`` (safetensors
+ JSON) and becomes an MLflow child run whose payload is registered.
"""

from __future__ import annotations

from stages.config.cli import run_cli, stage_params
from stages.config.common import validate_section
from stages.config.params import RuntimeParams, TuneParams
from stages.jobs.tuning import run_tuning


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("tune", TuneParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    summary = run_tuning("tune", p, p.methods, rt, p.out_dir, continual=True)
    for k, v in summary.items():
        print(f"{k:40s} avg test acc {v.get('avg_test_acc', float('nan')):.4f}")


if __name__ == "__main__":
    run_cli(main)
