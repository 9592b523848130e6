"""Stage ``pretrain``: the backbones every later stage starts from (``stages.jobs.pretraining``).

``source: train`` (default suite, offline) trains each tiny timm model on the prepared
``source`` set; ``source: timm`` (paper configuration) takes timm's pretrained weights, from
the hub or from a local file (``checkpoint_file``, through ``pretrained_cfg_overlay``).
Either way the result is ``outputs/pretrain/<arch>.safetensors`` + ``<arch>.json``, plus
``results.parquet`` (one row per arch, with lineage) and ``curves.png``.
"""

from __future__ import annotations

from stages.config.cli import run_cli, stage_params
from stages.config.common import validate_section
from stages.config.params import PretrainParams, RuntimeParams
from stages.jobs.pretraining import run


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("pretrain", PretrainParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    print(run(p, rt))


if __name__ == "__main__":
    run_cli(main)
