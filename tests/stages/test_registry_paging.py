"""The payload registry reads every page of MLflow's searches: ``list_registered`` (and the
served model's task list) and ``register_payload``'s idempotency check see results past one
page (a page size of 2 here stands for MLflow's 1,000 / 10,000)."""

from __future__ import annotations

import pytest

PAGE = 2


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from stages.tracking.store import make_client

    client = make_client(uri)
    return client, client.create_experiment("payloads", artifact_location=(tmp_path / "art").as_uri())


def _run(client, exp: str) -> str:
    rid = client.create_run(exp).info.run_id
    client.set_terminated(rid)
    return rid


def test_list_registered_and_served_tasks_read_every_page(store):
    from stages.serving.build import registered_tasks
    from stages.tracking.payloads import list_registered, register_payload

    client, exp = store
    tasks = [f"t{i}" for i in range(5)]
    for task in tasks:
        register_payload(_run(client, exp), "vit", task, "recast", tags={}, page_size=PAGE)
    client.create_registered_model("other.model")  # not a payload: listed by no prefix filter
    listed = list_registered(page_size=PAGE)
    assert [r["name"] for r in listed] == [f"recast.vit.recast.{t}" for t in tasks]
    assert [{k: str(v) for k, v in r["aliases"].items()} for r in listed] == [{"current": "1"}] * 5
    assert registered_tasks("vit", "recast") == tasks  # build's default task list, through the same paging


def test_register_payload_finds_its_version_past_the_first_page(store):
    from stages.tracking.payloads import register_payload

    client, exp = store
    runs = [_run(client, exp) for _ in range(5)]
    versions = [register_payload(rid, "vit", "a", "recast", tags={}, page_size=PAGE) for rid in runs]
    assert versions == ["1", "2", "3", "4", "5"]
    # re-registering (a resumed stage) every run, in both orders, finds its version on whatever page
    again = [register_payload(rid, "vit", "a", "recast", tags={}, page_size=PAGE) for rid in runs + runs[::-1]]
    assert again == versions + versions[::-1]
    assert len(client.search_model_versions("name = 'recast.vit.recast.a'")) == 5  # no duplicate version
    assert client.get_model_version_by_alias("recast.vit.recast.a", "current").version in ("5", 5)
