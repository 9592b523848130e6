"""Average accuracy, forgetting, BWT and FWT on a hand-computed 3 x 3 accuracy matrix."""

import pytest

from recast.baselines.results import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting_per_task,
    forward_transfer,
)

# R[i][j]: accuracy on task j after training task i. Task 0 improves after task 1 (0.80 ->
# 0.85), so forgetting (from the best earlier value) and BWT (from the just-trained value)
# differ; task 1 gains after task 2 (negative forgetting).
R = [[0.80, None, None],
     [0.85, 0.70, None],
     [0.60, 0.75, 0.90]]
HEAD_ONLY_DIAGONAL = [0.50, 0.60, 0.80]  # b_j of FWT: head-only's accuracy on task j


def test_average_accuracy():
    assert average_accuracy(R) == pytest.approx((0.60 + 0.75 + 0.90) / 3)  # 0.75
    assert average_accuracy(R) == pytest.approx(0.75, abs=1e-12)


def test_forgetting():
    # task 0: max(0.80, 0.85) - 0.60 = 0.25; task 1: 0.70 - 0.75 = -0.05; task 2: none
    assert forgetting_per_task(R) == pytest.approx([0.25, -0.05, None])
    assert average_forgetting(R) == pytest.approx(0.10, abs=1e-12)


def test_backward_transfer():
    # ((0.60 - 0.80) + (0.75 - 0.70)) / 2 = (-0.20 + 0.05) / 2
    assert backward_transfer(R) == pytest.approx(-0.075, abs=1e-12)


def test_forward_transfer_against_head_only():
    # ((0.70 - 0.60) + (0.90 - 0.80)) / 2; task 0 and b_0 are left out
    assert forward_transfer(R, HEAD_ONLY_DIAGONAL) == pytest.approx(0.10, abs=1e-12)
    assert forward_transfer(R, [99.0, 0.60, 0.80]) == pytest.approx(0.10, abs=1e-12)


def test_single_task_and_bad_reference():
    one = [[0.9]]
    assert (average_accuracy(one), average_forgetting(one), backward_transfer(one),
            forward_transfer(one, [0.5])) == (0.9, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="reference has 2 entries, expected one per task"):
        forward_transfer(R, [0.5, 0.6])
    with pytest.raises(ValueError, match=r"acc_matrix\[0\]\[1\] must be None"):
        backward_transfer([[0.5, 0.5], [0.5, 0.5]])
