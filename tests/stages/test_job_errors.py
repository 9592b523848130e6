"""Errors cross the wire intact: every exception class of the project survives a pickle
round-trip (found automatically, so a new class is covered), and a job's error reaches the
driver through Ray as a JobError naming the job and the original error."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import sys

import pytest

from recast.data import DataError
from stages.config.params import RuntimeParams
from stages.jobs.cache import code_fingerprint
from stages.jobs.fanout import CodeVersionError, JobError, check_code, run_jobs

PACKAGES = ("recast", "stages", "pipelines")
SAMPLE = {"str": "value-{name}", "int": 7, "float": 0.25}


def project_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in a module of recast/, stages/ or pipelines/."""
    found = {}
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def sample_instance(cls: type[BaseException]) -> BaseException:
    """``cls`` built with a distinct value for each required constructor argument."""
    if cls.__init__ is BaseException.__init__ or cls.__init__ is Exception.__init__:
        return cls("value-message")
    args = []
    for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is param.empty:
            annotation = str(param.annotation).split("|")[0].strip()
            value = SAMPLE.get(annotation, SAMPLE["str"])
            args.append(value.format(name=name) if isinstance(value, str) else value)
    return cls(*args)


EXCEPTIONS = project_exceptions()


def test_discovery_finds_the_known_classes() -> None:
    names = {c.__name__ for c in EXCEPTIONS}
    assert {"DataError", "ParamsError", "JobError", "CodeVersionError"} <= names, names


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_every_project_exception_survives_pickle(cls: type[BaseException]) -> None:
    err = sample_instance(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err) and back.args == err.args
    assert vars(back) == vars(err)


def failing_job(spec, inputs):
    """A job whose data is missing."""
    raise DataError(f"/nowhere/{spec['task']}/manifest.json", "manifest not found (run the prepare stage first)")


@pytest.mark.timeout(300)
def test_job_error_reaches_the_driver_through_ray(tmp_path) -> None:
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if ray.is_initialized():
        ray.shutdown()
    rt = RuntimeParams(num_cpus=1, max_retries=0, cache_dir=str(tmp_path), progress=False, inline_jobs=0)
    try:
        with pytest.raises(JobError) as info:
            run_jobs("err", failing_job, [{"id": "err/vit/recast/mnist_lo5/s42", "task": "mnist_lo5"}], rt)
    finally:
        ray.shutdown()
    _assert_job_error(info.value, tmp_path)


def test_job_error_of_an_inline_job_is_the_same(tmp_path) -> None:
    """A single job runs in the driver (no Ray start): its error reads exactly as through Ray."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    rt = RuntimeParams(num_cpus=1, max_retries=0, cache_dir=str(tmp_path), progress=False)
    with pytest.raises(JobError) as info:
        run_jobs("err", failing_job, [{"id": "err/vit/recast/mnist_lo5/s42", "task": "mnist_lo5"}], rt)
    assert not ray.is_initialized()
    _assert_job_error(info.value, tmp_path)


def _assert_job_error(err: JobError, tmp_path) -> None:
    assert type(err) is JobError  # not Ray's wrapper: the driver re-raises the job's own JobError
    assert (err.job_id, err.error_type) == ("err/vit/recast/mnist_lo5/s42", "DataError")
    assert err.message == "/nowhere/mnist_lo5/manifest.json: manifest not found (run the prepare stage first)"
    assert str(err) == f"job err/vit/recast/mnist_lo5/s42 failed: DataError: {err.message}"
    assert "failing_job" in err.traceback
    assert not list(tmp_path.rglob("*.json"))  # nothing cached for a failed job


def test_a_job_on_other_code_fails_naming_both_fingerprints() -> None:
    check_code(code_fingerprint())
    with pytest.raises(CodeVersionError, match=rf"code fingerprint {code_fingerprint()} differs from the "
                                               r"driver's 0{16}: this worker imports .*'recast'"):
        check_code("0" * 16)
