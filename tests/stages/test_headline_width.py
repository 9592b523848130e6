"""The headline numbers DVC compares (``metrics/report.json``): their names, and ``dvc exp show
--only-changed`` for two experiments of the default configuration that differ in seeds, rendered
by real DVC in a 200-column terminal with every changed number whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stages.config.common import REPO_ROOT, read_params
from stages.report.tables import SEQUENTIAL_SUFFIX, headline_metrics, headline_name

DVC = str(Path(sys.executable).parent / "dvc")


def test_headline_names():
    assert [headline_name(m) for m in ("head_only", "recast", "adaptformer", "adaptformer_recast", "lora",
                                       "clr_recast", "full_ft", "ewc", "recast" + SEQUENTIAL_SUFFIX,
                                       "lora" + SEQUENTIAL_SUFFIX)] == \
        ["head", "rc", "af", "af+rc", "lora", "clr+rc", "full", "ewc", "seq", "lora_seq"]


def test_headline_metrics_numbers_and_groups():
    summary = {"vit/head_only": {"avg_test_acc": 0.50514, "trainable_params": 433.0, "train_seconds": 60.0},
               "vit/recast": {"avg_test_acc": 0.55834, "trainable_params": 505.0, "train_seconds": 30.0},
               "vit/recast_sequential": {"avg_test_acc": 0.5638, "avg_forgetting": 0.0, "sequential": True,
                                         "train_seconds": 12.0},
               "vit/ewc": {"avg_test_acc": 0.4761, "avg_forgetting": 0.186, "sequential": True}}
    h = headline_metrics(summary, {"vit": {"min_weight_cosine": 0.99999912}, "note": "not an arch"})
    assert h == {"vit": {"head": 50.51, "rc": 55.83, "seq": 56.38, "ewc": 47.61}, "fgt": {"vit": 0.0},
                 "params": {"vit": {"head": 433, "rc": 505}}, "mimic_cos": {"vit": 0.999999}, "train_min": 1.7}
    with pytest.raises(ValueError, match="two methods of vit are named 'rc'"):
        headline_metrics({"vit/recast": summary["vit/recast"], "vit/rc": summary["vit/recast"]}, {})


def default_summary(seed_shift: float) -> dict:
    """A stage summary with every (arch, method) the default configuration runs, the numbers moved
    by ``seed_shift`` (what a seed change does): per-task methods of tune and combine, and the
    sequential ones (RECAST's as ``recast_sequential``)."""
    p = read_params(REPO_ROOT / "params.yaml")
    archs = p["tune"]["archs"]
    out = {}
    for section in ("tune", "combine"):
        for name, spec in p[section]["methods"].items():
            for arch in spec.get("archs") or archs:
                out[f"{arch}/{name}"] = {"avg_test_acc": 0.5123 + seed_shift, "trainable_params": 500.0,
                                         "train_seconds": 100.0 + 1000 * seed_shift}
    for arch, methods in p["tune"]["continual"]["methods"].items():
        for m in methods:
            key = f"{arch}/{m}" + (SEQUENTIAL_SUFFIX if f"{arch}/{m}" in out else "")
            forgetting = 0.0 if m == "recast" else 0.1234 + seed_shift  # RECAST's: nothing moves
            out[key] = {"avg_test_acc": 0.4789 + seed_shift, "avg_forgetting": forgetting,
                        "sequential": True, "train_seconds": 50.0}
    return out


@pytest.mark.timeout(300)
def test_exp_show_only_changed_fits_200_columns_for_a_seed_change(tmp_path):
    """DVC's own table at 200 columns: every headline number a seed change moves is a whole column
    (DVC cuts what does not fit to ``…``), and so is the changed param."""
    runs = {"[42]": default_summary(0.0), "[42, 1998]": default_summary(0.0123)}
    for seeds, summary in runs.items():
        (tmp_path / f"{seeds}.json").write_text(json.dumps(headline_metrics(summary, {"vit": {"min_weight_cosine": 1.0},
                                                                                     "resnet": {"min_weight_cosine": 1.0}})))
    (tmp_path / "params.yaml").write_text("tune:\n  seeds: [42]\n")
    (tmp_path / "write.py").write_text(textwrap.dedent("""
        import json, shutil, yaml
        seeds = yaml.safe_load(open("params.yaml"))["tune"]["seeds"]
        shutil.copy(f"{seeds}.json".replace("'", ""), "metrics/report.json")
        open("out.txt", "w").write(str(seeds))
    """))
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          evaluate:
            cmd: python write.py
            params: [tune.seeds]
            deps: [write.py]
            outs: [out.txt]
            metrics:
              - metrics/report.json:
                  cache: false
    """))
    (tmp_path / "metrics").mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(*cmd: str, columns: int = 200) -> str:
        proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "COLUMNS": str(columns)}, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    sh("git", "init", "-q")
    sh(DVC, "init", "-q")
    sh(DVC, "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "one seed")
    sh(DVC, "exp", "run", "-q", "-n", "two-seeds", "-S", "tune.seeds=[42,1998]")
    one, two = (json.loads((tmp_path / f"{s}.json").read_text()) for s in runs)

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    changed = [k for k, v in flat(one).items() if flat(two)[k] != v]
    assert len(changed) == 11  # 10 accuracies and the minutes trained; RECAST's forgetting stays 0
    shown = sh(DVC, "exp", "show", "--only-changed", "--no-pager")
    print(shown)
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 200
    header = next(line for line in lines if "Experiment" in line).split()
    assert [c for c in header if c in changed] == changed and "tune.seeds" in header, header
    row = next(line for line in lines if "[two-seeds]" in line).split()
    assert all(str(flat(two)[c]) in row for c in changed), row
