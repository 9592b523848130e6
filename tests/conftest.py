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


# ``make test`` runs two pytest-xdist workers with ``--dist loadfile``: a test file is one unit of
# work, so its module fixtures are built once. The hooks below (inert without xdist) keep files
# that share an expensive session fixture on one worker and hand out the slow files first, so
# that neither worker is left with a long file at the end while the other idles.
SHARED_FIXTURE_FILES = {  # file -> work unit
    "tests/stages/test_pipeline_e2e.py": "e2e",  # both read pipeline_run: one clean dvc repro (minutes)
    "tests/stages/test_lineage_e2e.py": "e2e",
    "tests/stages/test_pipeline_experiments_e2e.py": "e2e",  # after the two above: adds an experiment, commits
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SHARED_FIXTURE_FILES.get(path, path)

    config.option.loadscopereorder = False  # keep the order of pytest_collection_modifyitems below
    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under xdist: files with a test marked ``slow`` first (stable: files stay contiguous)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)
