"""The served model on Ray Serve (``stages.serving.ray_app``) as a user starts it: ``serve run`` of
the shipped ``infra/serve/recast-serve.yaml`` (its port, replicas and body limit changed) on a
local Ray it starts itself, against the test store's ``recast-serve.vit.recast@current``.
Concurrent mixed-task requests are answered as the pyfunc model's ``predict`` answers them, in
forwards that hold rows of several requests and tasks; refused requests are MLflow's HTTP 400 (and
413 for a body over the limit, before it is decoded); a replica killed under load is replaced and
only the requests it held fail."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from serving_store import REPO, as_frame, b64, bad_requests, built, image_file, rows, served_model, store  # noqa: F401

from helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a local Ray and Serve: ~1 min to start
REPLICAS, MAX_REQUEST_BYTES = 2, 1_500_000  # 12 flattened-float rows are ~0.8 MB of JSON
REPLICA_TITLE = "ServeReplica:recast:RecastServe"


@contextlib.contextmanager
def serve_run(store, tmp: Path) -> Iterator[tuple[str, psutil.Process]]:
    """``serve run`` of the shipped config on a free port with REPLICAS replicas; yields (base URL,
    the serve run process). Stopped with SIGINT (Serve and its local Ray shut down), then killed."""
    cfg = yaml.safe_load((REPO / "infra" / "serve" / "recast-serve.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    assert cfg["http_options"]["host"] == "127.0.0.1"
    app = cfg["applications"][0]
    app["args"]["max_request_bytes"] = MAX_REQUEST_BYTES
    app["deployments"][0]["num_replicas"] = REPLICAS
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.5  # two replicas on a 2-core machine
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "MLFLOW_TRACKING_URI": store.uri, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    log_path = tmp / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(path)], cwd=tmp, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while len(replicas(psutil.Process(proc.pid))) < REPLICAS or not _up(port):
                assert proc.poll() is None, log_path.read_text()[-4000:]
                assert time.time() < deadline, log_path.read_text()[-4000:]
                time.sleep(1)
            yield f"http://127.0.0.1:{port}", psutil.Process(proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def replicas(root: psutil.Process) -> dict[int, psutil.Process]:
    """The replica worker processes under ``root`` (Ray titles them ``ray::ServeReplica:<app>:<deployment>``)."""
    out = {}
    for p in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(REPLICA_TITLE in part for part in p.cmdline()):
                out[p.pid] = p
    return out


def post(url: str, body: dict | bytes) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of a POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text or b"{}"), dict(err.headers)
        except json.JSONDecodeError:
            return err.code, {"text": text.decode(errors="replace")}, dict(err.headers)


@pytest.fixture(scope="module")
def server(store, built, tmp_path_factory):
    with serve_run(store, tmp_path_factory.mktemp("ray-serve")) as running:
        yield running


@pytest.fixture(scope="module")
def served(store, built):
    return served_model(store)


def bodies(clients: int, per_client: int, seed: int) -> list[list[dict]]:
    """Per client its requests: 1-12 rows of task a, b or both; floats, PNG and uint8 pixel rows."""
    gen = torch.Generator().manual_seed(seed)
    mixes = (["a", "b"], ["b"], ["a", "b", "b"], ["a"])
    out = []
    for c in range(clients):
        reqs = []
        for r in range(per_client):
            mix, recs = mixes[(c + r) % len(mixes)], []
            for i in range(1 + (5 * c + 3 * r) % 12):
                task, kind = mix[i % len(mix)], (c + r + i) % 3
                if kind == 0:
                    recs.append({"task": task, "image": torch.randn(3 * 32 * 32, generator=gen).tolist()})
                else:
                    pixels = torch.randint(0, 256, (3, 24, 24), generator=gen, dtype=torch.uint8).numpy()
                    recs.append({"task": task, "image": b64(image_file(pixels, "PNG")) if kind == 1
                                 else pixels.transpose(1, 2, 0).tolist()})
            reqs.append({"dataframe_records": recs})
        out.append(reqs)
    return out


def wrong_rows(out: dict, want) -> int:
    """Rows of an answer that differ from ``predict``'s (class, or a probability off by > 1e-5)."""
    got = out["predictions"]
    assert [r["task"] for r in got] == want["task"].tolist()
    return sum(r["class"] != c or len(r["probabilities"]) != len(p) or np.abs(np.subtract(r["probabilities"], p)).max() > 1e-5
               for r, c, p in zip(got, want["class"], want["probabilities"]))


def run_clients(url: str, bodies_: list[list[dict]], during=None) -> dict[tuple[int, int], tuple]:
    """Every client's requests one after another, the clients at once; per request
    (status, answer, headers, start, end). ``during`` runs in the caller's thread meanwhile."""
    got: dict[tuple[int, int], tuple] = {}
    barrier = threading.Barrier(len(bodies_) + 1)

    def client(c: int) -> None:
        barrier.wait()
        for r, body in enumerate(bodies_[c]):
            start = time.monotonic()
            status, out, headers = post(url, body)
            got[c, r] = (status, out, headers, start, time.monotonic())

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(bodies_))]
    for t in threads:
        t.start()
    barrier.wait()
    result = during() if during else None
    for t in threads:
        t.join(timeout=400)
    return got if during is None else (got, result)


def test_concurrent_mixed_requests_equal_predict_in_shared_forwards(server, served):
    """8 clients x 4 requests of mixed tasks at once: every answer equals the pyfunc model's
    ``predict`` of its rows (0 errors, 0 wrong rows), and requests were batched: some forward
    held rows of several requests and both tasks."""
    url, _ = server
    model, _ = served
    reqs = bodies(8, 4, seed=3)
    want = [[model.predict(as_frame(b)) for b in r] for r in reqs]
    got = run_clients(url + "/invocations", reqs)
    errors = [(k, g[0], str(g[1])[-300:]) for k, g in got.items() if g[0] != 200]
    assert (len(got), errors) == (32, [])
    assert sum(wrong_rows(got[c, r][1], want[c][r]) for c, r in got) == 0
    shared = [(int(g[2]["x-recast-batch-rows"]), int(g[2]["x-recast-batch-tasks"]))
              for (c, r), g in got.items() if int(g[2]["x-recast-batch-rows"]) > len(reqs[c][r]["dataframe_records"])]
    assert shared, "no forward held rows of more than one request"
    assert max(t for _, t in shared) == 2


def test_refused_requests_are_mlflow_errors_and_oversized_bodies_413(server):
    """The scoring server's refusals (HTTP 400, INVALID_PARAMETER_VALUE, the named problem), and
    HTTP 413 for a body over ``max_request_bytes``: declared by Content-Length, or streamed in
    chunks without one; it is not decoded (not JSON at all here, which would be a 400)."""
    url, _ = server
    _, x = rows(1)
    cases = bad_requests(x)
    for name, words, body in cases:
        status, out, _ = post(url + "/invocations", body)
        assert (status, out.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), (name, status, out)
        message = out["message"].split("Error: ", 1)[-1]
        assert all(w in message for w in words), (name, message)
    assert len(cases) == 15
    status, out = post_refused(url + "/invocations", b"x" * (MAX_REQUEST_BYTES + 1))
    assert (status, out["error_code"]) == (413, "REQUEST_LIMIT_EXCEEDED")
    assert str(MAX_REQUEST_BYTES) in out["message"]
    status, out, _ = post(url + "/invocations", b"{" + b" " * (MAX_REQUEST_BYTES - 2) + b"}")  # at the limit: read
    assert status == 400 and "dataframe" in out["message"].lower(), (status, out)
    status, out = post_refused(url + "/invocations", iter([b"y" * 100_000] * (MAX_REQUEST_BYTES // 100_000 + 2)),
                               chunked=True)
    assert (status, out["error_code"]) == (413, "REQUEST_LIMIT_EXCEEDED")


def post_refused(url: str, body, chunked: bool = False) -> tuple[int, dict]:
    """(status, JSON answer) of a POST the server may answer (413) and close BEFORE it has read the
    whole body: a broken pipe or reset while sending is expected then, the answer is still read."""
    host, port = url[7:].split("/", 1)[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Transfer-Encoding": "chunked"} if chunked else {})}
    try:
        try:
            conn.request("POST", "/" + url[7:].split("/", 1)[1], body=body, headers=headers, encode_chunked=chunked)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and stopped reading
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_killed_replica_is_replaced_and_only_its_requests_fail(server, served):
    """8 clients send mixed requests in a loop; once answers flow, a replica's process is
    SIGKILLed. Ray Serve replaces it (a new replica process, REPLICAS again); a request fails only
    if it was in flight when the replica died, every other answer equals ``predict``, and every
    request sent after the replacement (at least 16) succeeds."""
    url, root = server
    model, _ = served
    reqs = bodies(8, 3, seed=11)
    want = [[model.predict(as_frame(b)) for b in r] for r in reqs]
    before = replicas(root)
    assert len(before) == REPLICAS
    got: list[tuple] = []  # (client, body, status, answer, start, end)
    stop = threading.Event()

    def client(c: int) -> None:
        i = 0
        while not stop.is_set():
            start = time.monotonic()
            status, out, _ = post(url + "/invocations", reqs[c][i % 3])
            got.append((c, i % 3, status, out, start, time.monotonic()))
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 300
    try:
        while len(got) < 8:  # requests flow
            assert time.time() < deadline
            time.sleep(0.1)
        victim = next(iter(before.values()))
        killed_at = time.monotonic()
        victim.kill()
        while True:
            now = replicas(root)
            if len(now) == REPLICAS and set(now) - set(before):
                replaced_at = time.monotonic()
                break
            assert time.time() < deadline, f"replica {victim.pid} not replaced: {sorted(now)}"
            time.sleep(0.5)
        while sum(g[4] > replaced_at for g in got) < 16:
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    failed = [g for g in got if g[2] != 200]
    in_flight = [g for g in got if g[4] <= killed_at <= g[5]]
    assert in_flight, "the replica was killed with no request in flight"
    assert all(g[4] <= killed_at <= g[5] for g in failed), [(g[2], str(g[3])[:300]) for g in failed]
    assert sum(wrong_rows(g[3], want[g[0]][g[1]]) for g in got if g[2] == 200) == 0
    after = [g for g in got if g[4] > replaced_at]
    assert len(after) >= 16 and all(g[2] == 200 for g in after)
    print(f"replica {victim.pid} killed: {len(got)} requests, {len(in_flight)} in flight at the kill, "
          f"{len(failed)} failed {sorted({g[2] for g in failed})}, replaced in {replaced_at - killed_at:.1f} s, "
          f"{len(after)} sent after it")
