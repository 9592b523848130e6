"""Command-line entry of the stages: ``--params``, validation of every section before any
compute, and running a stage module from its importable name.

``python -m stages.tune`` executes ``stages/tune.py`` as ``__main__``; Ray pickles functions by
module name, so a job function defined in ``__main__`` could not be found on a worker. Every
stage therefore ends with ``entry(__name__, __spec__)``, which re-imports the module under its
real name and calls that copy's ``main``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from stages.config.common import PARAMS_ENV, ParamsError, StageKilled, read_params


def stage_params(argv: list[str] | None, description: str | None, own_section_only: bool = False) -> dict[str, Any]:
    """Parse ``--params`` and validate EVERY section before the stage computes anything.

    With ``own_section_only`` (the prepare stage, which reads only its own section and needs
    neither timm nor the model plans that the cross-section checks build: ~5 s of imports) the
    file is returned unvalidated and the stage validates its own section; every later stage
    validates every section before its compute, so a bad key still stops the pipeline before
    any training."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default=None, help="params file (default: params.yaml at the repo root)")
    args = ap.parse_args(argv)
    if args.params is not None:  # the lineage of the stage's runs names and hashes this file
        os.environ[PARAMS_ENV] = str(Path(args.params).resolve())
    data = read_params(args.params)
    if not own_section_only:
        from stages.config.validate import validate_all  # noqa: PLC0415 - imports timm; prepare does without

        validate_all(data)
    return data


def entry(name: str, spec) -> None:
    """When ``name`` is ``__main__``, run ``main()`` of the module ``spec`` names (see above)."""
    if name != "__main__":
        return
    module = importlib.import_module(spec.name if spec is not None else name)
    try:
        result = module.main()
    except ParamsError as err:  # names every bad key; a traceback would bury it
        print(err, file=sys.stderr)
        sys.exit(2)
    except StageKilled as err:  # SIGTERM outside a ray.get (inside one, Ray raises KeyboardInterrupt)
        print(f"{spec.name if spec is not None else name}: {err}", file=sys.stderr)
        sys.exit(128 + 15)
    sys.exit(result if isinstance(result, int) else 0)
