"""A served model over many tasks (issue 31, item 3), at T = 50 in a temporary sqlite store:
answers bit for bit those of the same payloads loaded one by one (what the served model computed
before packing), a load whose store round trips do not grow with T (payload packs), a version
with one more task fetching one pack of that task from a replica's cache, and a corrupt cache
entry or a changed store file detected by its sha256 and never served."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import torch
from serving_store import banks, frame, payload, register

from benchmarks.store_calls import count_store_calls

T = 50
NAME = "recast-serve.vit.recast"


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """T + 1 registered payloads (heads of 3..7 classes); versions over the first 2, T and T + 1
    tasks; the reference model: the payload files loaded one by one (``recast.io.load_payload``)."""
    from recast.io import load_payload
    from stages.jobs.backbones import load_backbone
    from stages.serving.build import build

    root = tmp_path_factory.mktemp("tasks")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RECAST_PAYLOAD_CACHE")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["RECAST_PAYLOAD_CACHE"] = str(root / "build-cache")
    banks(root, seed=0)
    trained = load_backbone("vit", root / "pretrain", root / "mimic").recast()
    names = [f"t{i}" for i in range(T + 1)]
    for i, task in enumerate(names):
        register(payload(trained, task, 3 + i % 5, root / "payloads", seed=i + 1), task)
    versions = {n: build("vit", "recast", root / "pretrain", root / "mimic", 32, tasks=names[:n]) for n in (2, T, T + 1)}
    ref = load_backbone("vit", root / "pretrain", root / "mimic").recast()
    for task in names:
        load_payload(ref, root / "payloads" / task / f"{task}-s42", task=task)
    yield SimpleNamespace(root=root, names=names, versions=versions, ref=ref.eval())
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _load(version: dict, cache: Path, monkeypatch):
    import mlflow

    monkeypatch.setenv("RECAST_PAYLOAD_CACHE", str(cache))
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version['version']}")
    return model, model.unwrap_python_model()


def _want(ref, tasks: list[str], x: torch.Tensor) -> tuple[list[int], list[list[float]]]:
    """What the served model answered before packing: one mixed forward of the one-by-one model."""
    with torch.no_grad():
        logits = ref(x, tasks=tasks)
    probs = [torch.softmax(row[:ref.num_classes(t)], dim=0) for row, t in zip(logits, tasks)]
    return [int(p.argmax()) for p in probs], [p.tolist() for p in probs]


def _rows(names: list[str], n: int = 64, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [names[int(i)] for i in torch.randint(len(names), (n,), generator=g)], torch.randn(n, 3, 32, 32, generator=g)


def test_answers_at_50_tasks_are_bit_identical_to_payloads_loaded_one_by_one(many, tmp_path, monkeypatch):
    model, inner = _load(many.versions[T], tmp_path / "cache", monkeypatch)
    assert sorted(inner.tasks) == sorted(many.names[:T])
    assert len(inner.rc.packed) == T  # packed: no parameter or head module per task
    assert all(list(layer.coefs) == ["pretrained"] for _, layer in inner.rc.recast_layers())
    assert list(inner.rc.task_heads.heads) == ["pretrained"]
    tasks, x = _rows(many.names[:T])
    out = model.predict(frame(tasks, x))
    classes, probs = _want(many.ref, tasks, x)
    assert out["class"].tolist() == classes
    assert [list(p) for p in out["probabilities"]] == probs  # equal floats, not close ones
    assert len(set(tasks)) > 30


def test_load_store_calls_do_not_grow_with_the_tasks(many, tmp_path, monkeypatch):
    """Loading T = 50 tasks makes the store calls of loading 2, plus one file per extra pack
    (version 50 keeps version 2's pack of t0, t1 and adds one of the other 48)."""
    counts, packs = {}, {}
    for n in (2, T):
        with count_store_calls() as calls:
            _, inner = _load(many.versions[n], tmp_path / f"cache{n}", monkeypatch)
        counts[n], packs[n] = dict(calls), len(many.versions[n]["config"]["packs"])
        assert (inner.payload_cache.fetches, inner.payload_cache.hits) == (packs[n], 0)
    assert (packs[2], packs[T]) == (1, 2)
    extra = {"artifact_calls": 1, "artifact_files": 1, "total": 2}  # the second pack
    assert {k: v - counts[2].get(k, 0) for k, v in counts[T].items()} == {k: extra.get(k, 0) for k in counts[T]}, counts
    assert counts[T].get("registry", 0) <= 3 and counts[T].get("tracking", 0) <= 3, counts


def test_one_more_task_fetches_one_pack_of_that_task(many, tmp_path, monkeypatch):
    """Version T + 1 = version T + task t50: its config keeps version T's pack and adds a pack of
    t50 alone, so a replica that loaded version T fetches exactly one payload."""
    v, v1 = many.versions[T]["config"]["packs"], many.versions[T + 1]["config"]["packs"]
    assert len(v) == 2 and all(p in v1 for p in v)
    assert [p["tasks"] for p in v1 if p not in v] == [["t50"]]
    cache = tmp_path / "cache"
    _, inner = _load(many.versions[T], cache, monkeypatch)
    assert (inner.payload_cache.fetches, inner.payload_cache.hits) == (2, 0)
    model, inner = _load(many.versions[T + 1], cache, monkeypatch)
    assert (inner.payload_cache.fetches, inner.payload_cache.hits, inner.payload_cache.corrupt) == (1, 2, 0)
    tasks, x = _rows(many.names, 16, seed=3)
    assert model.predict(frame(tasks, x))["probabilities"].tolist() == _want(many.ref, tasks, x)[1]


def test_corrupt_cache_entry_is_fetched_again_and_a_changed_store_file_is_refused(many, tmp_path, monkeypatch):
    from stages.serving.packs import PayloadCache, PayloadDigestError

    pack = next(p for p in many.versions[T]["config"]["packs"] if "t2" in p["tasks"])  # the pack of t2..t49
    cache = tmp_path / "cache"
    _load(many.versions[T], cache, monkeypatch)
    entry = PayloadCache(cache).path(pack["sha256"])
    good = entry.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF  # one byte of a tensor: still a readable pack, other numbers
    entry.write_bytes(bytes(bad))
    model, inner = _load(many.versions[T], cache, monkeypatch)
    assert (inner.payload_cache.corrupt, inner.payload_cache.fetches, inner.payload_cache.hits) == (1, 1, 1)
    assert entry.read_bytes() == good
    tasks, x = _rows(many.names[:T], 16, seed=4)
    assert model.predict(frame(tasks, x))["probabilities"].tolist() == _want(many.ref, tasks, x)[1]

    stored = Path(urlparse(pack["uri"]).path)  # the store's own copy changed after the build
    stored.write_bytes(bytes(bad))
    try:
        from stages.serving.pyfunc import RecastServed

        served = RecastServed()
        monkeypatch.setenv("RECAST_PAYLOAD_CACHE", str(tmp_path / "empty"))
        with pytest.raises(PayloadDigestError) as err:
            served.load_context(SimpleNamespace(model_config=many.versions[T]["config"]))
        assert pack["sha256"][:12] in str(err.value) and pack["uri"] in str(err.value)
        again = pickle.loads(pickle.dumps(err.value))
        assert (type(again), str(again)) == (PayloadDigestError, str(err.value))
        assert not hasattr(served, "rc")  # nothing served
        assert not PayloadCache(tmp_path / "empty").path(pack["sha256"]).exists()  # nor cached
    finally:
        stored.write_bytes(good)


def test_plan_packs_keeps_unchanged_packs_and_bounds_their_number():
    from stages.serving.packs import plan_packs

    def pack(name, tasks):
        return {"uri": name, "sha256": name, "tasks": tasks}

    pinned = {f"t{i}": f"models:/t{i}/1" for i in range(10)}
    previous = {"payloads": dict(pinned), "packs": [pack("A", ["t0", "t1", "t2", "t3"]), pack("B", ["t4", "t5"])]}
    more = {**pinned, "t10": "models:/t10/1"}
    keep, opened, fetch = plan_packs(more, previous, pack_tasks=4, extra=1)
    assert ([p["uri"] for p in keep], opened, fetch) == (["A", "B"], [], ["t6", "t7", "t8", "t9", "t10"])
    changed = {**pinned, "t5": "models:/t5/2"}  # B is opened: t4 read from it, t5 fetched
    keep, opened, fetch = plan_packs(changed, previous, pack_tasks=4, extra=1)
    assert ([p["uri"] for p in keep], [p["uri"] for p in opened], fetch) == (["A"], ["B"], ["t5", "t6", "t7", "t8", "t9"])
    # ceil(12 / 4) + 1 = 4 packs at most: the smallest kept ones are opened and re-packed
    small = {"payloads": dict(pinned), "packs": [pack(c, [f"t{i}"]) for c, i in zip("CDEFGH", range(6))]}
    twelve = {**pinned, "t10": "x", "t11": "y"}
    keep, opened, fetch = plan_packs(twelve, small, pack_tasks=4, extra=1)
    assert ([p["uri"] for p in keep], [p["uri"] for p in opened]) == (["C"], ["H", "G", "F", "E", "D"])
    assert fetch == ["t6", "t7", "t8", "t9", "t10", "t11"]  # 1 kept + 3 new packs of t1..t11


def _fetch_slowly(root: str, sha: str, data: bytes, log: str) -> int:
    """One replica reading ``sha`` through the cache at ``root``: its fetch (counted in ``log``)
    takes 0.5 s, so the two replicas' reads overlap."""
    import time

    from stages.serving.packs import PayloadCache

    def fetch(directory):
        with open(log, "a") as out:
            out.write("fetch\n")
        time.sleep(0.5)
        (directory / "pack.safetensors").write_bytes(data)
        return directory / "pack.safetensors"

    return len(PayloadCache(root).read(sha, fetch, "a pack"))


def test_concurrent_replicas_fetch_a_pack_once(tmp_path):
    import hashlib
    import multiprocessing

    data = b"pack bytes " * 1000
    sha = hashlib.sha256(data).hexdigest()
    log = tmp_path / "fetches.log"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        sizes = pool.starmap(_fetch_slowly, [(str(tmp_path / "cache"), sha, data, str(log))] * 2)
    assert sizes == [len(data)] * 2
    assert log.read_text().splitlines() == ["fetch"]  # the second replica waited on the lock, then read the cache
    assert [p.name for p in (tmp_path / "cache" / sha[:2]).glob("*.safetensors")] == [f"{sha}.safetensors"]
