"""Stage ``prepare``: params validation before compute, the built suite and suite.json."""

from __future__ import annotations

import json

import pytest
import yaml

from recast.data import read_manifest
from stages.config.common import ParamsError
from stages.config.params import PrepareParams
from stages.prepare import main, run


def _params_file(tmp_path, **prepare):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"prepare": prepare, "other_stage": {"ignored": 1}}))
    return str(path)


def test_main_builds_offline_subset_and_suite_json(tmp_path, capsys):
    out = tmp_path / "prepared"
    main(["--params", _params_file(tmp_path, out_dir=str(out), tasks=["mnist_lo5"], image_size=16, seed=2)])
    summary = json.loads((out / "offline" / "suite.json").read_text())
    assert summary["tasks"] == ["mnist_lo5"] and summary["source"] == "source"
    assert summary["counts"]["mnist_lo5"] == {"train": 900, "val": 100, "test": 250}
    assert summary["counts"]["source"] == {"train": 1800, "val": 200, "test": 500}
    assert summary["num_classes"] == {"mnist_lo5": 5, "source": 10}
    assert summary["image_size"]["mnist_lo5"] == [16, 16]
    assert read_manifest(out / "offline" / "mnist_lo5").seed == 2
    assert "prepared suite 'offline'" in capsys.readouterr().out


@pytest.mark.parametrize(
    "prepare, key",
    [
        ({"tasks": ["mnist_lo5", "svhn"]}, "prepare.tasks"),
        ({"val_fraction": 0.6}, "prepare.val_fraction"),
        ({"image_size": 4}, "prepare.image_size"),
        ({"suite": "imagenet"}, "prepare.suite"),
        ({"batch": 3}, "prepare.batch"),
        ({"suite": "paper"}, "prepare.data_root"),
        ({"suite": "paper", "tasks": ["cifar10"], "data_root": "/nonexistent/raw"}, "prepare.data_root"),
    ],
)
def test_bad_params_fail_before_compute_naming_the_key(tmp_path, prepare, key):
    out = tmp_path / "prepared"
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        main(["--params", _params_file(tmp_path, out_dir=str(out), **prepare)])
    assert not out.exists()


def test_run_paper_suite_on_a_cifar_fixture(tmp_path, fx, cifar_raw):
    fx.write_cifar10_bin(tmp_path / "raw", cifar_raw["cifar10"])
    params = PrepareParams(suite="paper", out_dir=str(tmp_path / "prepared"), data_root=str(tmp_path / "raw"),
                           tasks=["cifar10"], image_size=64)
    suite_dir = run(params)
    summary = json.loads((suite_dir / "suite.json").read_text())
    assert suite_dir == tmp_path / "prepared" / "paper"
    assert summary["tasks"] == ["cifar10"] and summary["source"] is None
    assert sum(summary["counts"]["cifar10"].values()) == 46 and summary["image_size"]["cifar10"] == [32, 32]


def test_prepare_stage_imports_neither_timm_nor_the_cross_section_checks():
    """The prepare stage reads sklearn arrays: it validates its own section only, so its process
    skips timm, torchvision (and torch._dynamo with them) and the model plans (~5 s per run)."""
    import subprocess
    import sys

    code = ("import sys, stages.prepare; "
            "print(sorted(m for m in ('timm', 'torchvision', 'stages.config.validate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
