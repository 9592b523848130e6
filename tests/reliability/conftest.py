"""Fixtures of the reliability suite (helpers in ``faults``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults import MlflowServer, write_stage_files


@pytest.fixture
def stage_files(tmp_path: Path) -> Path:
    """A project root holding tiny pretrain/mimic/tune outputs and task manifests."""
    return write_stage_files(tmp_path / "project")


@pytest.fixture
def mlflow_server(tmp_path: Path):
    root = tmp_path / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root)
    yield server
    server.stop()
