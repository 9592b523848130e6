"""Stage ``mimic``: Neural Mimicry per architecture -> banks + base coefficients + report
(``stages.jobs.mimicry``).

Outputs ``outputs/mimic/<arch>/{banks,base}.safetensors`` (+ JSON sidecars), ``recast.json``
(config) and ``report.json``: per-module weight cosine, layer-wise feature cosine on a batch of
source images (Gaussian noise when there is no source set), source-task accuracy of the
reconstructed model vs the original (when there is a source set), and, on each prepared task's
own test images, the top-1 agreement of the two models' source-class predictions and the cosine
of their penultimate features; gradient mimicry's loss every ``eval_every`` steps. Also
``results.parquet`` (one row per arch, with lineage). Jobs run on ``runtime.device``.
"""

from __future__ import annotations

from stages.config.cli import run_cli, stage_params
from stages.config.common import validate_section
from stages.config.params import MimicParams, RuntimeParams
from stages.jobs.mimicry import run


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("mimic", MimicParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    print(run(p, rt))


if __name__ == "__main__":
    run_cli(main)
