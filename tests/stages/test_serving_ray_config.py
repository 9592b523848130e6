"""The shipped Ray Serve configs (``infra/serve/*.yaml``) are valid for ``serve run`` (Ray's own
``ServeDeploySchema``), listen on 127.0.0.1, name an importable app builder, and carry arguments
``RayServeArgs`` accepts; an unknown argument is refused by name. Static: no Ray is started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "infra" / "serve").glob("*.yaml"))


def test_both_configs_are_shipped():
    assert [p.name for p in CONFIGS] == ["recast-serve-cluster.yaml", "recast-serve.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_config_on_localhost(path):
    from ray.serve.schema import ServeDeploySchema

    from stages.serving.ray_app import RayServeArgs, RecastServe, app

    cfg = ServeDeploySchema(**yaml.safe_load(path.read_text()))
    assert cfg.http_options.host == "127.0.0.1"
    (application,) = cfg.applications
    module, _, attr = application.import_path.partition(":")
    assert (module, attr) == ("stages.serving.ray_app", "app")
    args = RayServeArgs(**application.args)
    assert args.max_request_bytes == 32 * 2**20 and args.max_batch_rows >= 256  # >= the default max_rows
    (deployment,) = application.deployments
    assert deployment.name == RecastServe.name
    raw = yaml.safe_load(path.read_text())["applications"][0]["deployments"][0]
    if "cluster" in path.name:  # replicas across the cluster: autoscaled
        assert "num_replicas" not in raw and raw["autoscaling_config"] == {
            "min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 16}
    else:
        assert raw["num_replicas"] == 1
    with pytest.raises(ValueError, match="max_request_byte"):
        app({**application.args, "max_request_byte": 1})  # a misspelt key: refused, named
