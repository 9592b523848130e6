"""Concurrent MLflow writes (sqlite store) neither fail nor lose a run; the registry lists payloads."""

import multiprocessing as mp
import os

import pytest


def _worker(uri: str, idx: int, n: int) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from stages.tracking.payloads import register_payload
    from stages.tracking.runs import Tracker

    tr = Tracker(f"stage{idx}", "concurrency")
    for j in range(n):
        rid = tr.child(f"job{idx}-{j}", {"i": idx, "j": j}, {"acc": 0.5 + 0.01 * j, "host": f"h{idx}", "ray_node": ""})
        register_payload(rid, "vit", f"task{j}", "recast", {"test_acc": f"{0.5 + 0.01 * idx:.3f}"},
                         val_acc=0.5 + 0.01 * idx)
    tr.finish({"done": 1.0})


@pytest.mark.slow  # several writer processes on one sqlite store
@pytest.mark.timeout(300)
def test_concurrent_writers_lose_nothing(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    procs, n_proc, n_runs = [], 4, 3
    ctx = mp.get_context("spawn")
    for i in range(n_proc):
        p = ctx.Process(target=_worker, args=(uri, i, n_runs))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    from mlflow.tracking import MlflowClient

    from stages.tracking.payloads import list_registered

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    names = sorted(r.info.run_name for r in runs)
    assert len(names) == n_proc * (n_runs + 1)
    assert len(set(names)) == len(names)  # every run exactly once
    assert all(r.info.status == "FINISHED" for r in runs)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == n_proc * n_runs
    for r in children:  # the job's host is a tag, not a (non-numeric) metric; an empty node id is left out
        assert r.data.tags["host"] == f"h{r.data.params['i']}" and "ray_node" not in r.data.tags
        assert set(r.data.metrics) == {"acc"}
    registered = list_registered()
    assert [r["name"] for r in registered] == [f"recast.vit.recast.task{j}" for j in range(n_runs)]
    versions = client.search_model_versions("name='recast.vit.recast.task0'")
    assert len(versions) == n_proc
    best = client.get_model_version_by_alias("recast.vit.recast.task0", "best")
    assert best.tags["test_acc"] == f"{0.5 + 0.01 * (n_proc - 1):.3f}"  # highest accuracy wins "best"


def test_download_payload_reads_the_configured_store(tmp_path, monkeypatch):
    """A stale process-wide store in mlflow (an earlier ``mlflow.set_tracking_uri`` in the same
    process, with MLFLOW_TRACKING_URI set again since) must not redirect the download."""
    import mlflow

    from stages.tracking.payloads import download_payload, register_payload
    from stages.tracking.runs import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    payload = tmp_path / "mnist_rot-s42.json"
    payload.write_text('{"numel": 3}')
    tr = Tracker("tune", "download")
    rid = tr.child("tune/vit/recast/mnist_rot", {"task": "mnist_rot"}, {"test_acc": 0.9}, artifacts=[payload])
    register_payload(rid, "vit", "mnist_rot", "recast", {"test_acc": "0.9"}, val_acc=0.9)
    tr.finish()
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = tracking_utils._tracking_uri  # None unless set: put back as it was, leaving no global behind
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/elsewhere.db")  # sets mlflow's global and the variable
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the variable is ours again; mlflow's global is not
    try:
        folder = download_payload("vit", "mnist_rot", "recast", alias="best")
    finally:
        mlflow.set_tracking_uri(previous)
    assert [p.name for p in folder.iterdir()] == ["mnist_rot-s42.json"]
    assert (folder / "mnist_rot-s42.json").read_text() == '{"numel": 3}'


def test_registry_cli_lists_and_fetches(tmp_path, monkeypatch, capsys):
    from stages.registry.__main__ import main
    from stages.tracking.payloads import register_payload
    from stages.tracking.runs import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    tr = Tracker("tune", "cli")
    for task, acc in (("mnist_rot", 0.9), ("uci_digits", 0.7)):
        payload = tmp_path / f"{task}-s42.json"
        payload.write_text(f'{{"task": "{task}"}}')
        rid = tr.child(f"tune/vit/recast/{task}", {"task": task}, {"test_acc": acc}, artifacts=[payload])
        register_payload(rid, "vit", task, "recast", {"test_acc": str(acc)}, val_acc=acc)
    tr.finish()
    assert main(["list", "--arch", "vit"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2:] == ["| recast.vit.recast.mnist_rot | vit | recast | mnist_rot | 1 | 1 |",
                         "| recast.vit.recast.uci_digits | vit | recast | uci_digits | 1 | 1 |"]
    assert main(["list", "--arch", "resnet"]) == 0 and len(capsys.readouterr().out.splitlines()) == 2
    assert main(["fetch", "vit", "uci_digits", "--out", str(tmp_path / "device")]) == 0
    assert (tmp_path / "device" / "uci_digits-s42.json").read_text() == '{"task": "uci_digits"}'
    assert main(["fetch", "vit", "cifar10", "--out", str(tmp_path / "device")]) == 1
    assert "no payload 'best' for arch=vit task=cifar10" in capsys.readouterr().err


def test_artifacts_are_logged_once_per_job_and_linked(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    from stages.tracking.runs import Tracker

    payload = tmp_path / "p.safetensors"
    payload.write_bytes(os.urandom(50_000))
    record = tmp_path / "cache" / "key.mlflow.json"
    first = Tracker("tune", "once")
    rid = first.child("job", {}, {"acc": 0.5}, [payload], logged_at=record)
    again = Tracker("tune", "once")  # a re-run: the job's result came from the cache
    rid2 = again.child("job", {}, {"acc": 0.5}, [payload], logged_at=record)
    logged = list((tmp_path / "mlartifacts").rglob("p.safetensors"))
    assert len(logged) == 1 and os.path.samefile(logged[0], payload)  # one copy: MLflow's is a hard link
    run2 = again.client.get_run(rid2)
    assert run2.data.tags["artifacts_run_id"] == rid and run2.data.tags["artifacts_uri"].endswith("/payload")
    assert again.client.list_artifacts(rid2) == [] and len(first.client.list_artifacts(rid, "payload")) == 1


def test_experiment_in_a_temporary_copy_logs_to_its_workspace(tmp_path, monkeypatch):
    """A DVC experiment run in a temporary copy (``dvc exp run --queue`` / ``--temp``: DVC sets
    DVC_ROOT to the workspace) logs its runs and payload versions to the workspace's store, tagged
    with the experiment's name and baseline, into an experiment of kind training runs; a DVC_ROOT
    that is no workspace fails instead of making a store of its own."""
    from mlflow.tracking import MlflowClient

    from stages.config.common import resolve_shared
    from stages.tracking.payloads import register_payload
    from stages.tracking.runs import Tracker
    from stages.tracking.store import TrackingUnavailable, tracking_uri

    workspace = tmp_path / "workspace"
    (workspace / ".dvc").mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-seeds")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    assert tracking_uri() == f"sqlite:///{workspace / 'mlflow.db'}"
    assert resolve_shared("outputs/.jobcache") == workspace / "outputs" / ".jobcache"
    tr = Tracker("tune", "recast")
    rid = tr.child("vit/recast/t0", {"seed": 42}, {"test_acc": 0.5})
    version = register_payload(rid, "vit", "t0", "recast", {"test_acc": "0.5"}, val_acc=0.5)
    tr.finish()
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("recast")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and {r.data.tags["dvc.exp_name"] for r in runs} == {"tiny-seeds"}
    assert {r.data.tags["dvc.exp_baseline_rev"] for r in runs} == {"a" * 40}
    mv = client.get_model_version("recast.vit.recast.t0", version)
    assert mv.tags["dvc.exp_name"] == "tiny-seeds"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "gone"))
    with pytest.raises(TrackingUnavailable, match="not a DVC workspace"):
        Tracker("tune", "recast")


def test_best_alias_follows_validation_never_test_accuracy(tmp_path, monkeypatch):
    """``best`` = the version with the highest validation accuracy: a later payload with a higher
    TEST but lower validation accuracy does not take it. A registry whose ``best`` an older rule
    chose by test accuracy (versions without the ``val_acc`` tag) is re-aliased by its runs'
    ``val_acc`` metrics on its next registration."""
    from mlflow.tracking import MlflowClient

    from stages.tracking.payloads import register_payload, registry_name
    from stages.tracking.runs import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    tr = Tracker("tune", "best-alias")
    rids = {}
    for i, (val, test) in enumerate(((0.9, 0.5), (0.8, 0.95), (0.7, 0.99), (0.95, 0.6), (0.5, 0.5))):
        rids[i] = tr.child(f"job{i}", {"i": i}, {"val_acc": val, "test_acc": test})
    register_payload(rids[0], "vit", "a", "recast", {"test_acc": "0.5"}, val_acc=0.9)
    register_payload(rids[1], "vit", "a", "recast", {"test_acc": "0.95"}, val_acc=0.8)
    name = registry_name("vit", "a", "recast")
    assert str(client.get_model_version_by_alias(name, "best").version) == "1"
    assert str(client.get_model_version_by_alias(name, "current").version) == "2"
    assert client.get_registered_model(name).tags["best_by"] == "val_acc"

    # an older registry: versions without a val_acc tag, best chosen by test accuracy
    old = registry_name("vit", "b", "recast")
    client.create_registered_model(old)
    for i in (2, 3):
        run = client.get_run(rids[i])
        client.create_model_version(old, f"{run.info.artifact_uri}/payload", run_id=rids[i],
                                    tags={"test_acc": str(run.data.metrics["test_acc"])})
    client.set_registered_model_alias(old, "best", "1")  # test 0.99, val 0.7
    register_payload(rids[4], "vit", "b", "recast", {"test_acc": "0.5"}, val_acc=0.5)
    assert str(client.get_model_version_by_alias(old, "best").version) == "2"  # val 0.95 (test 0.6)
    assert client.get_model_version(old, "1").tags["val_acc"] == "0.700000"  # read from its run, once
    tr.finish()


def test_ui_links_open_training_runs(tmp_path, monkeypatch, capsys):
    """MLflow 3.17's UI picks its view by the ``workflowType`` URL parameter (else a browser-local
    switch that starts on GenAI), not by the experiment's tag: every link we print carries it. A
    stage prints its run's link when it ends; ``python -m stages.registry link`` the experiment's."""
    from stages.registry.__main__ import main as registry_main
    from stages.tracking.runs import Tracker
    from stages.tracking.store import ui_link

    assert ui_link("3", uri="sqlite:////x/mlflow.db") == \
        "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    assert ui_link("3", "abc", uri="https://user:secret@mlflow.example.org/") == \
        "https://mlflow.example.org/#/experiments/3/runs/abc?workflowType=machine_learning"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with Tracker("tune", "linked") as tr:
        pass
    err = capsys.readouterr().err
    assert f"[mlflow] tune: http://127.0.0.1:5000/#/experiments/{tr.experiment_id}/runs/{tr.parent_id}" \
           f"?workflowType=machine_learning" in err, err
    assert registry_main(["link", "--experiment", "linked"]) == 0
    assert capsys.readouterr().out.strip() == ui_link(tr.experiment_id)
    assert registry_main(["link", "--experiment", "absent"]) == 1
    assert "no MLflow experiment named 'absent'" in capsys.readouterr().err
