"""The served model through the real ``mlflow models serve --env-manager local`` on 127.0.0.1:
mixed-task requests, errors a client reads (HTTP 400 and the named problem), 8 concurrent
clients answered exactly as the sequential ``predict``, the evaluate stage's test images as PNG
getting the evaluate stage's classes, and the README's example request posted by its curl line."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from serving_store import (  # noqa: F401
    MAX_ROWS,
    REPO,
    TEST_ROWS,
    as_frame,
    b64,
    bad_requests,
    built,
    check,
    frame,
    mlflow_serve,
    per_task,
    post,
    rows,
    served_model,
    store,
)

CLIENTS, REQUESTS_PER_CLIENT = 8, 5


@pytest.fixture(scope="module")
def server(store, built):
    with mlflow_serve(store) as url:
        yield url + "/invocations"


@pytest.fixture(scope="module")
def served(store, built):
    return served_model(store)


def test_mlflow_models_serve_answers_a_mixed_request(store, server):
    tasks, x = rows(3, seed=2)
    df = frame(tasks, x)
    status, out = post(server, {"dataframe_split": {"columns": ["task", "image"], "data": df.values.tolist()}})
    assert status == 200, out
    got = out["predictions"]
    assert [r["task"] for r in got] == tasks
    check([r["class"] for r in got], [r["probabilities"] for r in got], per_task(store.rc, tasks, x))


def test_refused_requests_are_http_400_naming_the_problem(server):
    tasks, x = rows(1)
    cases = bad_requests(x)
    for name, words, body in cases:
        status, out = post(server, body)
        assert (status, out.get("error_code")) == (400, "INVALID_PARAMETER_VALUE"), (name, status, out)
        message = out["message"].split("Error: ", 1)[-1]  # the server prefixes "Failed to predict data '<frame>'"
        assert all(w in message for w in words), (name, message)
    assert len(cases) == 15


def _bodies() -> list[list[dict]]:
    """Per client its requests: 1-12 rows of task a, b or both, floats and PNG rows mixed."""
    from serving_store import image_file

    gen = torch.Generator().manual_seed(7)
    mixes = (["a", "b"], ["b"], ["a", "b", "b"], ["a"])
    out = []
    for c in range(CLIENTS):
        reqs = []
        for r in range(REQUESTS_PER_CLIENT):
            n = 1 + (5 * c + 3 * r) % 12
            mix = mixes[(c + r) % len(mixes)]
            recs = []
            for i in range(n):
                task = mix[i % len(mix)]
                if (c + i) % 3 == 2:  # a PNG row
                    pixels = torch.randint(0, 256, (3, 24, 24), generator=gen, dtype=torch.uint8).numpy()
                    recs.append({"task": task, "image": b64(image_file(pixels, "PNG"))})
                else:
                    recs.append({"task": task, "image": torch.randn(3 * 32 * 32, generator=gen).tolist()})
            reqs.append({"dataframe_records": recs})
        out.append(reqs)
    return out


def test_concurrent_clients_get_the_sequential_answers(server, served):
    """8 clients at once, 5 requests each of 1-12 rows of mixed tasks: every answer equals the
    sequential ``predict`` of the same rows on one ``mlflow.pyfunc.load_model``: 0 errors, 0
    wrong rows (class equal, probabilities within 1e-5)."""
    model, _ = served
    bodies = _bodies()
    want = [[model.predict(as_frame(b)) for b in reqs] for reqs in bodies]  # sequential, in process
    got: dict[tuple[int, int], tuple[int, dict]] = {}
    barrier = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        barrier.wait()
        for r, body in enumerate(bodies[c]):
            got[c, r] = post(server, body)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    errors = [(k, s, str(o)[-300:]) for k, (s, o) in got.items() if s != 200]
    wrong = total = 0
    for (c, r), (status, out) in got.items():
        if status != 200:
            continue
        expect = want[c][r]
        for row, cls, probs in zip(out["predictions"], expect["class"], expect["probabilities"]):
            total += 1
            wrong += (row["class"] != cls or len(row["probabilities"]) != len(probs)
                      or np.abs(np.subtract(row["probabilities"], probs)).max() > 1e-5)
    assert (len(got), errors) == (CLIENTS * REQUESTS_PER_CLIENT, [])
    assert (wrong, total) == (0, sum(len(b["dataframe_records"]) for reqs in bodies for b in reqs))


def test_png_test_images_get_the_evaluate_stage_classes(store, server):
    """Every test image of tasks a (stored 32 px) and b (24 px), saved as lossless PNG and sent
    through the server, gets the class the evaluate stage computes: its loader
    (``BatchLoader``, train=False) and one mixed-task forward (as ``recast.training.evaluate_mixed``)."""
    from recast.data import BatchLoader
    from recast.training import evaluate_mixed
    from stages.serving.example import encoded_images

    loaders = {t: BatchLoader(store.data / t, "test", 256, 32, train=False, seed=0) for t in ("a", "b")}
    batches = {t: next(iter(loaders[t])) for t in loaders}
    tasks = [t for t in loaders for _ in range(TEST_ROWS)]
    with torch.no_grad():
        logits = store.rc(torch.cat([batches[t][0] for t in loaders]), tasks=tasks)
    want = logits.argmax(dim=1).tolist()
    labels = torch.cat([batches[t][1] for t in loaders]).tolist()
    sent, got = [], []
    for t in loaders:
        files, file_labels = encoded_images(store.data / t, "test")
        assert file_labels == batches[t][1].tolist()
        sent += [{"task": t, "image": b64(f)} for f in files]
    for start in range(0, len(sent), MAX_ROWS):
        status, out = post(server, {"dataframe_records": sent[start:start + MAX_ROWS]})
        assert status == 200, out
        got += [r["class"] for r in out["predictions"]]
    assert len(got) == 2 * TEST_ROWS
    assert sum(g != w for g, w in zip(got, want)) == 0, (got, want)
    acc = evaluate_mixed(store.rc, loaders)
    for i, t in enumerate(loaders):
        part = slice(i * TEST_ROWS, (i + 1) * TEST_ROWS)
        assert acc[t] == sum(g == y for g, y in zip(got[part], labels[part])) / TEST_ROWS


def _readme_serving_lines() -> tuple[str, str]:
    block = re.search(r"## Serving\n.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    example = next(line for line in lines if "stages.serving example" in line)
    curl = next(line for line in lines if line.startswith("curl "))
    return example, curl


def test_readme_example_request_runs_verbatim(store, server, served, tmp_path):
    """The README's two lines: the example command writes request.json from the prepared data
    (here: params.yaml's tune.data_dir set to the test's prepared tasks, and its tasks a,b), and
    its curl line posts it (to this server's port)."""
    example, curl = _readme_serving_lines()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tune"]["data_dir"] = str(store.data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    readme_tasks = re.search(r"--tasks (\S+)", example).group(1)
    cmd = shlex.split(example.replace(readme_tasks, "a,b"))
    assert cmd[:3] == ["python", "-m", "stages.serving"]
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = json.loads((tmp_path / "request.json").read_text())
    assert [r["task"] for r in body["dataframe_records"]] == ["a", "a", "b", "b"]
    port = re.search(r"127\.0\.0\.1:(\d+)", curl).group(1)
    posted = subprocess.run(["bash", "-c", curl.replace(f"127.0.0.1:{port}", server.rsplit("/", 1)[0][7:])],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert posted.returncode == 0, posted.stderr
    out = json.loads(posted.stdout)["predictions"]
    want = served[0].predict(pd.DataFrame(body["dataframe_records"]))
    assert [r["class"] for r in out] == want["class"].tolist()
    assert [len(r["probabilities"]) for r in out] == [3, 3, 5, 5]
