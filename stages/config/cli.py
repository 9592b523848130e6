"""Command-line entry of the stages: ``--params``, validation of every section before any
compute, and a stage's exit status (``run_cli``).

A stage script runs as ``__main__`` (``python -m stages.tune``) and ends with
``if __name__ == "__main__": run_cli(main)``. Its job functions live in ``stages.jobs``, never in
the script: Ray pickles functions by module name, and a worker cannot import ``__main__``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

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


def run_cli(main: Callable[[], Any]) -> NoReturn:
    """Run a stage's ``main()`` and exit: 2 on a ``ParamsError`` (its message names every bad
    key; a traceback would bury it), 143 on ``StageKilled``, else ``main``'s int result or 0."""
    try:
        result = main()
    except ParamsError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    except StageKilled as err:  # SIGTERM outside a ray.get (inside one, Ray raises KeyboardInterrupt)
        spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
        print(f"{spec.name if spec is not None else main.__module__}: {err}", file=sys.stderr)
        sys.exit(128 + 15)
    sys.exit(result if isinstance(result, int) else 0)
