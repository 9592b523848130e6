"""Ray fan-out: a worker killed mid-task is retried and the stage completes; a re-run resumes
from the job cache instead of recomputing."""

import copy
import os
import time
from pathlib import Path

import pytest
import torch

from stages.config.params import RuntimeParams
from stages.jobs.cache import spec_key
from stages.jobs.fanout import run_jobs
from stages.jobs.faults import FAULT_ENV
from stages.jobs.result import JobResult


def square_job(spec, inputs):
    """A job: returns metrics and a tensor."""
    x = torch.full((3,), float(spec["x"]))
    return JobResult({"y": spec["x"] ** 2, "pid": os.getpid()}, {"x": x})


@pytest.fixture(scope="module")
def ray_with_faults(tmp_path_factory):
    fault_dir = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_ENV] = str(fault_dir)
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    if ray.is_initialized():
        ray.shutdown()
    yield fault_dir
    ray.shutdown()
    os.environ.pop(FAULT_ENV, None)


@pytest.mark.slow  # fault injection: Ray workers killed mid-job
@pytest.mark.timeout(600)
def test_killed_workers_are_retried_and_rerun_resumes(ray_with_faults, tmp_path):
    rt = RuntimeParams(num_cpus=2, cpus_per_task=1, max_retries=2, cache_dir=str(tmp_path / "cache"), progress=False)
    specs = [{"id": f"sq/{i}", "x": i} for i in range(2)]
    seen = []
    results = run_jobs("sq", square_job, specs, rt, on_result=lambda s, r, cached: seen.append((s["id"], cached)))
    assert {k: v.metrics["y"] for k, v in results.items()} == {f"sq/{i}": i * i for i in range(2)}
    assert torch.equal(results["sq/1"].tensors["x"], torch.full((3,), 1.0))
    import ray

    nodes = {n["NodeID"] for n in ray.nodes()}
    assert {v.metrics["ray_node"] for v in results.values()} <= nodes and all(v.metrics["host"] for v in results.values())
    # every job's peak memory is measured from its own start (reset per job, whatever the worker ran before)
    assert all(0 < v.metrics["rss_start_mb"] <= v.metrics["peak_rss_mb"] for v in results.values())
    killed = sorted(p.name for p in ray_with_faults.iterdir())
    assert killed == [f"sq_{i}.killed" for i in range(2)]  # every job lost its worker once
    assert sorted(seen) == [(f"sq/{i}", False) for i in range(2)]  # each reported exactly once
    assert all((tmp_path / "cache" / "sq" / f"{spec_key(s)}.json").exists() for s in specs)

    # a re-run (e.g. after the stage was killed) takes every finished job from the cache
    seen.clear()
    again = run_jobs("sq", square_job, specs + [{"id": "sq/new", "x": 7}], rt,
                     on_result=lambda s, r, cached: seen.append((s["id"], cached)))
    assert sorted(seen) == sorted([(f"sq/{i}", True) for i in range(2)] + [("sq/new", False)])
    assert again["sq/new"].metrics["y"] == 49


def noisy_job(spec, inputs):
    """A job whose result depends on torch's RNG and float arithmetic: bit-comparable."""
    torch.manual_seed(spec["seed"])
    w = torch.randn(64, 64)
    x = torch.randn(128, 64)
    for _ in range(3):
        x = torch.tanh(x @ w / 8)
    return JobResult({"sum": float(x.sum()), "pid": os.getpid(), "threads": torch.get_num_threads()}, {"x": x})


def test_a_single_job_runs_in_the_driver_bit_identical_to_ray(tmp_path, monkeypatch):
    """One job left to compute: no local Ray start (``runtime.inline_jobs``); its result is the
    one a Ray worker computes, bit for bit, and the driver's torch threads are left as they were.
    Both paths run the job with ``runtime.torch_threads`` (1) threads, not ``cpus_per_task`` (2)
    nor the driver's count (2), and record the machine it ran on."""
    import sys

    import ray
    from ray import cloudpickle

    from recast.machine import cpu_model

    monkeypatch.delenv(FAULT_ENV, raising=False)  # fault injection needs Ray workers
    if ray.is_initialized():
        ray.shutdown()
    spec = {"id": "noisy/1", "seed": 3}
    torch.set_num_threads(2)
    rt = RuntimeParams(num_cpus=2, cpus_per_task=2, cache_dir=str(tmp_path / "a"), progress=False)
    assert rt.torch_threads == 1
    inline = run_jobs("noisy", noisy_job, [spec], rt)
    assert not ray.is_initialized() and torch.get_num_threads() == 2
    meta, tensors, machine = inline["noisy/1"].metrics, inline["noisy/1"].tensors, inline["noisy/1"].machine
    assert meta["pid"] == os.getpid() and meta["ray_node"] == "" and meta["job_wall_s"] > 0
    assert meta["threads"] == 1 and machine["torch_threads"] == 1
    assert machine["cpu_model"] == cpu_model() != ""
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (tmp_path / "a" / "noisy" / f"{spec_key(spec)}.json").exists()  # cached like a Ray job

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        on_ray = run_jobs("noisy", noisy_job, [spec],
                          rt.model_copy(update={"cache_dir": str(tmp_path / "b"), "inline_jobs": 0}))
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    ray_meta, ray_tensors = on_ray["noisy/1"].metrics, on_ray["noisy/1"].tensors
    assert ray_meta["pid"] != os.getpid() and ray_meta["ray_node"]
    assert ray_meta["threads"] == 1 and on_ray["noisy/1"].machine == machine
    assert ray_meta["sum"] == meta["sum"] and torch.equal(ray_tensors["x"], tensors["x"])
    assert (tmp_path / "a" / "noisy" / f"{spec_key(spec)}.safetensors").read_bytes() == \
        (tmp_path / "b" / "noisy" / f"{spec_key(spec)}.safetensors").read_bytes()


def sleepy_job(spec, inputs):
    """Leave a mark when started, then sleep."""
    Path(spec["marks"], f"{spec['id'].replace('/', '_')}.{os.getpid()}").touch()
    time.sleep(spec["sleep"])
    return JobResult({"i": spec["i"]})


@pytest.mark.slow  # fault injection: SIGTERM while jobs are in flight
def test_a_stopped_stage_cancels_its_outstanding_jobs(tmp_path, monkeypatch):
    """SIGTERM (StageKilled) while the driver publishes the first result: the job in flight is
    killed and the queued ones never start, although this process's Ray stays up."""
    import sys

    import ray
    from ray import cloudpickle

    from stages.config.common import StageKilled

    monkeypatch.delenv(FAULT_ENV, raising=False)
    if ray.is_initialized():
        ray.shutdown()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marks = tmp_path / "marks"
    marks.mkdir()
    specs = [{"id": f"slow/{i}", "i": i, "sleep": 1.0, "marks": str(marks)} for i in range(5)]
    submitted: list = []
    real_wait = ray.wait

    def wait_spy(refs, *args, **kwargs):  # records the stage's job refs, to wait on their end below
        if not submitted:
            submitted.extend(refs)
        return real_wait(refs, *args, **kwargs)

    def killed(spec, result, cached):
        raise StageKilled

    monkeypatch.setattr(ray, "wait", wait_spy)
    rt = RuntimeParams(num_cpus=1, cache_dir=str(tmp_path / "cache"), progress=False, inline_jobs=0)
    try:
        with pytest.raises(StageKilled):
            run_jobs("slow", sleepy_job, specs, rt, killed)
        monkeypatch.setattr(ray, "wait", real_wait)
        assert len(submitted) == len(specs)
        # Every job ends, cancelled or not (uncancelled, the 4 left run 1 s each); once all have
        # ended no job can start any more, so the marks counted then are final.
        ended, running = ray.wait(submitted, num_returns=len(submitted), timeout=120)
        assert not running, f"{len(running)} job(s) still running 120 s after the stage stopped"
        outcomes = []
        for ref in ended:
            try:
                ray.get(ref)
                outcomes.append("finished")
            except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError):
                outcomes.append("cancelled")
        started = sorted(p.name.split(".")[0] for p in marks.iterdir())
    finally:
        ray.shutdown()
    # Ray does not dispatch queued tasks in submission order, so count them: the job whose result
    # stopped the stage, and at most the one the worker had taken up meanwhile. Uncancelled: all 5.
    assert 1 <= outcomes.count("finished") <= 2 and outcomes.count("cancelled") >= 3, outcomes
    assert 1 <= len(started) <= 2, started


def test_duplicate_ids_rejected(tmp_path):
    rt = RuntimeParams(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="duplicate"):
        run_jobs("d", square_job, [{"id": "a", "x": 1}, {"id": "a", "x": 2}], rt)


def test_cache_key_covers_the_code(monkeypatch, tmp_path):
    """A result computed by other code is never reused: the key hashes recast/, stages/, pipelines/."""
    import stages.jobs.cache as cache

    spec = {"id": "sq/1", "x": 1}
    key = spec_key(spec)
    assert key == spec_key(dict(spec)) and len(cache.code_fingerprint()) == 16
    fake = tmp_path / "stages"
    fake.mkdir()
    (fake / "__init__.py").write_text("# another version of the code\n")
    real_find_spec = cache.importlib.util.find_spec

    def find_spec(name):
        found = real_find_spec(name)
        if name == "stages":  # a copy: find_spec hands out the imported module's own spec
            found = copy.copy(found)
            found.submodule_search_locations = [str(fake)]
        return found

    monkeypatch.setattr(cache.importlib.util, "find_spec", find_spec)
    cache.code_fingerprint.cache_clear()
    try:
        assert spec_key(spec) != key
    finally:
        monkeypatch.undo()
        cache.code_fingerprint.cache_clear()
    assert spec_key(spec) == key


def test_stored_tensors_share_the_job_cache_file(tmp_path):
    from safetensors.torch import load_file

    from stages.jobs.cache import job_file, store_tensors, write_cached

    rt = RuntimeParams(cache_dir=str(tmp_path / "cache"))
    spec = {"id": "sq/7", "x": 7}
    tensors = {"x": torch.arange(1000, dtype=torch.float32)}
    fresh = store_tensors(rt, "sq", spec, tensors, {"n": 1}, tmp_path / "out" / "fresh")  # nothing cached yet
    assert fresh.stat().st_nlink == 1
    write_cached(tmp_path / "cache" / "sq", spec_key(spec), JobResult({"y": 49}, tensors))
    st = store_tensors(rt, "sq", spec, tensors, {"n": 1}, tmp_path / "out" / "p")
    assert os.path.samefile(st, job_file(rt, "sq", spec, ".safetensors")) and st.stat().st_nlink == 2
    assert torch.equal(load_file(str(st))["x"], tensors["x"]) and st.read_bytes() == fresh.read_bytes()
    assert (tmp_path / "out" / "p.json").read_text().strip().replace(" ", "").replace("\n", "") == '{"n":1}'
