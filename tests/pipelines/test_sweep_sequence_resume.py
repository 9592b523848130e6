"""The sequence sweep kinds resume from their Tune checkpoints (``pipelines.tune_checkpoints``),
in-process with Tune's report / get_checkpoint replaced by an in-memory store of the same bytes:
a ``recast_sequence`` trial stopped after epoch 1 of its second task resumes there, a
``continual`` one stopped after its first task resumes at the second; the results equal those of
a trial never stopped. The Ray Tune run of the same is in test_sweep_resume.py (slow)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load, save

import pipelines.tune_checkpoints as tune_checkpoints
from pipelines.config import OrderSweep
from pipelines.specs import build_specs
from pipelines.trials import run_trial
from pipelines.tune_checkpoints import TuneSequenceCheckpoints, TuneTrialCheckpoints
from stages.jobs.inputs import InputStore

TASKS = ["mnist_lo5", "mnist_hi5_inv"]


class Stopped(Exception):
    pass


class FakeTune:
    """Tune's side of a trial's checkpoints: the last reported one (as stored bytes), every report."""

    def __init__(self) -> None:
        self.last, self.reports, self.points, self.stop_at = None, [], [], None

    def read(self, stem: str, trial_key: str):
        return None if self.last is None else (load(self.last[0]), json.loads(self.last[1]))

    def report(self, stem: str, tensors, meta, metrics) -> None:
        self.last = (save({k: v.contiguous() for k, v in tensors.items()}), json.dumps(meta))
        self.reports.append(dict(metrics))

    def fault(self, trial_key: str, point: str) -> None:
        self.points.append(point)
        if point == self.stop_at:
            raise Stopped(point)


@pytest.fixture
def fake_tune(monkeypatch) -> FakeTune:
    fake = FakeTune()
    monkeypatch.setattr(tune_checkpoints, "_read", fake.read)
    monkeypatch.setattr(tune_checkpoints, "_report", fake.report)
    monkeypatch.setattr(tune_checkpoints, "maybe_fault", fake.fault)
    return fake


def _spec(kind: str, tiny_train: dict):
    if kind == "continual_scored":  # as hpo's: scored on every task's validation split, reported per task
        spec, inputs = _spec("continual", tiny_train)
        return {**spec, "score_val": True}, inputs
    cfg = OrderSweep(tasks=TASKS, orders=[TASKS], continual=["ewc"] if kind == "continual" else [],
                     continual_epochs=2, train={**tiny_train, "epochs": 2},
                     **({"recast": None} if kind == "continual" else {}))
    store = InputStore()
    spec = next(s for s in build_specs("order", cfg, "cpu", store) if s["kind"] == kind)
    return spec, store.local(spec["inputs"])


def _trial(kind: str, spec, inputs) -> dict:
    """The trial with the checkpointer ``pipelines.sweep.sweep_trial`` gives its kind."""
    store = TuneTrialCheckpoints if kind == "recast_sequence" else TuneSequenceCheckpoints
    return run_trial(spec, inputs, checkpoint=store(spec["id"], _extra(spec)))


SAME = {"recast_sequence": ("acc_matrix", "final_acc", "val_acc_per_task", "avg_acc", "steps"),
        "continual": ("acc_matrix", "final_acc", "val_acc", "avg_acc", "state_sha256"),
        "continual_scored": ("acc_matrix", "final_acc", "val_acc", "val_acc_by_task", "avg_acc", "state_sha256")}


@pytest.mark.parametrize("kind, stop, resumed, points", [
    ("recast_sequence", "task:1:epoch:1", (1, 1), ["task:0:epoch:1", "task:0:epoch:2", "task:1:epoch:1"]),
    ("continual", "task:1", (1, 0), ["task:1"]),
    ("continual_scored", "task:1", (1, 0), ["task:1"]),
    ("continual_scored", "task:2", (2, 0), ["task:1", "task:2"]),  # lost after its last report: the score
])                                                                  # comes from the checkpoint's rows
def test_sequence_trial_resumes_from_its_tune_checkpoint(stage_outputs, tiny_train, fake_tune, kind, stop, resumed,
                                                         points) -> None:
    spec, inputs = _spec(kind, tiny_train)
    clean = run_trial(spec, inputs)  # no checkpoint: the trial never stopped
    fake_tune.stop_at = stop
    with pytest.raises(Stopped):
        _trial(kind, spec, inputs)
    assert fake_tune.points == points  # reported with a checkpoint: every epoch, or every task
    fake_tune.stop_at = None
    again = _trial(kind, spec, inputs)  # the retry: Tune hands it the last checkpoint
    assert (again["resumed_task"], again["resumed_epoch"]) == resumed
    assert (clean["resumed_task"], clean["resumed_epoch"]) == (0, 0)
    assert {k: again[k] for k in SAME[kind]} == {k: clean[k] for k in SAME[kind]}
    if kind == "recast_sequence":
        assert [r["task_index"] for r in fake_tune.reports] == [0, 0, 1, 1]  # the retry reported epoch 2 only
        assert [r["epoch"] for r in fake_tune.reports] == [0, 1, 0, 1]
    elif kind == "continual":  # the retry reported task 2; no val_acc: the trial is not scored
        assert fake_tune.reports == [{"tasks_done": 1, **_extra(spec)}, {"tasks_done": 2, **_extra(spec)}]
    else:  # each task with the mean validation accuracy of the tasks seen; the last one is the score
        assert [r["tasks_done"] for r in fake_tune.reports] == [1, 2]
        assert fake_tune.reports[-1]["val_acc"] == clean["val_acc"] and 0.0 <= clean["val_acc"] <= 1.0


def _extra(spec) -> dict:
    return {"trial_key": spec["id"], "final": False}
