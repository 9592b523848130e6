import json

import pytest

from recast.baselines import SequentialResult, forgetting_per_task

MATRIX = [[0.9, None, None],
          [0.7, 0.8, None],
          [0.6, 0.85, 0.9]]


def result(matrix=MATRIX):
    n = len(matrix)
    return SequentialResult(method="x", task_names=[f"t{i}" for i in range(n)], acc_matrix=matrix,
                            val_acc=[None] * n, trainable_params=[10] * n, shared_bytes=100,
                            task_bytes=[4, 8, 12][:n], training_state_bytes=[0] * n,
                            wall_time_s=[1.0] * n)


def test_forgetting_on_hand_made_matrix():
    f = forgetting_per_task(MATRIX)
    assert f[0] == pytest.approx(0.9 - 0.6)  # best earlier 0.9 (after task 0)
    assert f[1] == pytest.approx(0.8 - 0.85)  # improved later: negative forgetting
    assert f[2] is None
    r = result()
    assert r.final_acc == [0.6, 0.85, 0.9]
    assert r.avg_acc == pytest.approx(2.35 / 3)
    assert r.avg_forgetting == pytest.approx((0.3 - 0.05) / 2)


def test_forgetting_uses_max_over_earlier_stages_not_just_first():
    m = [[0.5, None, None], [0.9, 0.7, None], [0.4, 0.7, 0.8]]
    assert forgetting_per_task(m)[0] == pytest.approx(0.9 - 0.4)


def test_single_task_has_zero_average_forgetting():
    assert result([[0.7]]).avg_forgetting == 0.0


@pytest.mark.parametrize("bad", [[[0.9, 0.1], [0.7, 0.8]], [[0.9, None], [None, 0.8]], [[0.9]] * 2])
def test_malformed_matrix_is_rejected(bad):
    with pytest.raises(ValueError, match="acc_matrix"):
        forgetting_per_task(bad)


def test_to_json_round_trips_with_bytes():
    d = json.loads(json.dumps(result().to_json()))
    assert d["bytes_per_task"] == [104, 108, 112]
    assert d["forgetting"][2] is None
    assert d["acc_matrix"][0] == [0.9, None, None]
    assert d["avg_acc"] == pytest.approx(2.35 / 3)


def test_lengths_must_match_tasks():
    with pytest.raises(ValueError, match="wall_time_s"):
        SequentialResult(method="x", task_names=["a"], acc_matrix=[[0.5]], val_acc=[None],
                         trainable_params=[1], shared_bytes=0, task_bytes=[0],
                         training_state_bytes=[0], wall_time_s=[])
