import os
import shutil
import subprocess
from pathlib import Path

import pytest
import timm
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Under pytest-xdist (``make test`` runs two workers) the cores are shared between the workers.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, 2 // WORKERS))

REPO = Path(__file__).resolve().parents[1]
GENERATED = ("outputs/", "data/", "metrics/", "reports/", "mlflow.db", "mlartifacts/")


def copy_source_tree(dst: Path) -> Path:
    """Copy the repo's source files (tracked + untracked, not ignored) into ``dst``, without any
    stage output and without dvc.lock: what a fresh clone has. ``dst`` becomes a git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(GENERATED):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    (dst / "dvc.lock").unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


@pytest.fixture(scope="session")
def source_tree():
    """``source_tree(dst)`` copies the repo as a fresh clone would have it (see copy_source_tree)."""
    return copy_source_tree


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32).eval()


@pytest.fixture
def tiny_resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=10, layers=(2, 3, 2, 2)).eval()


SHARED_FIXTURE_GROUPS = {  # test files that share an expensive session fixture run on one worker
    "tests/stages/test_pipeline_e2e.py": "e2e",  # pipeline_run: one clean dvc repro (minutes)
    "tests/stages/test_lineage_e2e.py": "e2e",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """``--dist loadgroup`` (``make test``): every test file is one unit of work, so module
    fixtures are built once; files that share a session fixture form one group. Runs before
    xdist's own hook, which reads the marks."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            path = item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(SHARED_FIXTURE_GROUPS.get(path, path)))
