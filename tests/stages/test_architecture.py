"""The layering the project promises (ARCHITECTURE.md): no import cycles, even through
function-local imports; recast/ never imports stages/ or pipelines/, stages/ never imports
pipelines/; and dvc.yaml's deps of each stage cover the import closure of its entry module."""

from __future__ import annotations

import re

import yaml

from imports import REPO, closure, cycles, imports_of, modules


def test_no_import_cycles():
    assert cycles() == []


def test_layers_import_downwards_only():
    rank = {"recast": 0, "stages": 1, "pipelines": 2}
    wrong = [(m, t) for m in modules() for t in imports_of(m) if rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert wrong == []


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_dvc_deps_cover_each_stage_import_closure():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        entry = re.fullmatch(r"python -m ([\w.]+)", stage["cmd"]).group(1)
        files = sorted(str(modules()[m].relative_to(REPO)) for m in closure(entry))
        lost = [f for f in files if not _covered(f, stage["deps"])]
        if lost:
            missing[name] = lost
    assert missing == {}


def test_the_checks_see_a_cycle_and_a_missing_dep(tmp_path, monkeypatch):
    """The graph is real: stages.tune reaches stages.fanout and recast.training, and a fake
    reverse edge makes a cycle."""
    assert {"stages.fanout", "recast.training", "stages.params"} <= closure("stages.tune")
    import imports

    real = imports.imports_of
    monkeypatch.setattr(imports, "imports_of", lambda m: real(m) | ({"stages.tune"} if m == "stages.params" else set()))
    assert ["stages.cli", "stages.params", "stages.tune", "stages.validate"] == \
        [m for m in sorted(set().union(*imports.cycles())) if m in {"stages.cli", "stages.params", "stages.tune", "stages.validate"}]
