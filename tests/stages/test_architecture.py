"""The layering the project promises (ARCHITECTURE.md): no import cycles, even through
function-local imports; recast/ never imports stages/ or pipelines/, stages/ never imports
pipelines/; inside stages/, the top level holds only the DVC stage entry points, which may
import the sub-packages, and the sub-packages import only downwards (config <- tracking, report
<- jobs <- serving, registry) and never a stage or a command line (``__main__``); and dvc.yaml's
deps of each stage cover the import closure of its entry module. Each check is a function returning its violations, so that the
last tests can plant one of each and see it reported."""

from __future__ import annotations

import ast
import re

import yaml
from imports import REPO, closure, cycles, imports_of, modules

ENTRY_POINTS = ("prepare", "pretrain", "mimic", "tune", "combine", "evaluate")  # what dvc.yaml runs
# Sub-packages of stages/ by rank: a module imports sub-packages of a lower rank, or its own.
SUB_RANK = {"config": 0, "tracking": 1, "report": 1, "jobs": 2, "serving": 3, "registry": 3}


def upward_imports() -> list[tuple[str, str]]:
    """(importer, imported) pairs that point up: recast <- stages <- pipelines."""
    rank = {"recast": 0, "stages": 1, "pipelines": 2}
    return sorted((m, t) for m in modules() for t in imports_of(m) if rank[t.split(".")[0]] > rank[m.split(".")[0]])


def _sub(module: str) -> str | None:
    """The stages sub-package of ``module`` (None for ``stages`` itself and the entry points)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "stages" and len(parts) > 1 and parts[1] in SUB_RANK else None


def stages_layer_violations() -> list[tuple[str, str]]:
    """(importer, imported) pairs inside stages/ that break its layering."""
    entries = {f"stages.{e}" for e in ENTRY_POINTS}
    wrong = []
    for m in modules():
        if not m.startswith("stages"):
            continue
        for t in imports_of(m):
            if t in entries or t.endswith(".__main__"):  # nothing imports a stage or a command line
                wrong.append((m, t))
            elif m in entries or _sub(t) is None or _sub(m) is None:
                continue
            elif _sub(t) != _sub(m) and SUB_RANK[_sub(t)] >= SUB_RANK[_sub(m)]:
                wrong.append((m, t))
    return sorted(wrong)


def missing_dvc_deps(deps_of: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Per dvc.yaml stage, the files of its entry module's import closure its deps do not cover."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        entry = re.fullmatch(r"python -m ([\w.]+)", stage["cmd"]).group(1)
        deps = (deps_of or {}).get(name, stage["deps"])
        files = sorted(str(modules()[m].relative_to(REPO)) for m in closure(entry))
        lost = [f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
        if lost:
            missing[name] = lost
    return missing


def test_no_import_cycles():
    assert cycles() == []


def test_layers_import_downwards_only():
    assert upward_imports() == []


def test_stages_top_level_holds_only_the_entry_points():
    top = sorted(p.name for p in (REPO / "stages").glob("*.py"))
    assert top == sorted(["__init__.py", *(f"{e}.py" for e in ENTRY_POINTS)])
    subs = sorted(p.parent.name for p in (REPO / "stages").glob("*/__init__.py"))
    assert subs == sorted(SUB_RANK)
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(dvc) == sorted(ENTRY_POINTS)
    for sub in SUB_RANK:  # a one-line docstring, and no imports: importing a module of it stays cheap
        tree = ast.parse((REPO / "stages" / sub / "__init__.py").read_text())
        doc = ast.get_docstring(tree)
        assert doc and "\n" not in doc.strip(), sub
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], sub


def test_stages_sub_packages_import_downwards_and_never_a_stage():
    assert stages_layer_violations() == []


def test_dvc_deps_cover_each_stage_import_closure():
    assert missing_dvc_deps() == {}


# ----------------------------------------------------------------------------- the checks can fail
def _plant(monkeypatch, edges: dict[str, set[str]]) -> None:
    import imports

    real = imports.imports_of
    monkeypatch.setattr(imports, "imports_of", lambda m: real(m) | frozenset(edges.get(m, set())))
    monkeypatch.setitem(globals(), "imports_of", imports.imports_of)
    monkeypatch.setitem(globals(), "closure", imports.closure)


def test_the_graph_is_real():
    assert {"stages.jobs.fanout", "recast.training", "stages.config.params", "stages.config"} <= closure("stages.tune")
    assert "stages.jobs" not in closure("stages.prepare")


def test_a_planted_cycle_is_seen(monkeypatch):
    _plant(monkeypatch, {"stages.config.params": {"stages.tune"}})
    import imports

    watched = {"stages.config.cli", "stages.config.params", "stages.tune", "stages.config.validate"}
    assert sorted(watched) == [m for m in sorted(set().union(*imports.cycles())) if m in watched]


def test_planted_upward_imports_are_seen(monkeypatch):
    _plant(monkeypatch, {"recast.model": {"stages.config.common"}, "stages.jobs.fanout": {"pipelines.sweep", "stages.tune"},
                         "stages.config.params": {"stages.tracking.runs"}, "stages.report.tables": {"stages.jobs.results"},
                         "stages.tracking.lineage": {"stages.report.tables"}, "stages.jobs.specs": {"stages.registry.__main__"},
                         "stages.tune": {"stages.combine"}})
    assert upward_imports() == [("recast.model", "stages.config.common"), ("stages.jobs.fanout", "pipelines.sweep")]
    assert stages_layer_violations() == [("stages.config.params", "stages.tracking.runs"),
                                         ("stages.jobs.fanout", "stages.tune"),
                                         ("stages.jobs.specs", "stages.registry.__main__"),
                                         ("stages.report.tables", "stages.jobs.results"),
                                         ("stages.tracking.lineage", "stages.report.tables"),
                                         ("stages.tune", "stages.combine")]


def test_a_missing_dvc_dep_is_seen(monkeypatch):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    deps = [d for d in stages["tune"]["deps"] if d != "stages/jobs/tuning.py"]
    assert missing_dvc_deps({"tune": deps}) == {"tune": ["stages/jobs/tuning.py"]}
    _plant(monkeypatch, {"stages.prepare": {"stages.jobs.fanout"}})
    assert "stages/jobs/fanout.py" in missing_dvc_deps()["prepare"]
