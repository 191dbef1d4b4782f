"""Continual-learning metrics on a hand-written 3-task matrix with hand-computed values."""

from __future__ import annotations

import pytest

from tether.training.cl_metrics import (
    average_accuracy,
    backward_transfer,
    cl_metrics,
    forgetting,
    forward_transfer,
    general_ability_change,
    plot_accuracy_matrix,
)

# R[i][j]: score on task j after training task i
R = [
    [0.8, 0.3, 0.2],
    [0.6, 0.9, 0.4],
    [0.5, 0.7, 0.95],
]
BASE = [0.1, 0.2, 0.3]


def test_hand_computed_values():
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # BWT = mean(R[2][0]-R[0][0], R[2][1]-R[1][1]) = mean(-0.3, -0.2)
    assert backward_transfer(R) == pytest.approx(-0.25)
    # FWT = mean(R[0][1]-b[1], R[1][2]-b[2]) = mean(0.1, 0.1)
    assert forward_transfer(R, BASE) == pytest.approx(0.1)
    # f_0 = max(0.8, 0.6) - 0.5 = 0.3 ; f_1 = max(0.9) - 0.7 = 0.2
    assert forgetting(R) == pytest.approx([0.3, 0.2])


def test_forgetting_uses_the_best_earlier_score_not_the_diagonal():
    r = [[0.5, 0.0], [0.6, 0.9]]  # task 0 improved after task 1: negative forgetting, positive BWT
    r3 = [[0.5, 0, 0], [0.7, 0.8, 0], [0.4, 0.6, 0.9]]
    assert forgetting(r) == pytest.approx([-0.1])
    assert backward_transfer(r) == pytest.approx(0.1)
    assert forgetting(r3) == pytest.approx([0.3, 0.2])  # max(0.5, 0.7) - 0.4


def test_dataclass_and_general_row():
    m = cl_metrics(R, BASE, general=[0.48, 0.45, 0.5], general_base=0.5)
    d = m.to_dict()
    assert d["bwt"] == pytest.approx(-0.25) and d["fwt"] == pytest.approx(0.1)
    assert d["avg_forgetting"] == pytest.approx(0.25)
    assert d["final"] == pytest.approx([0.5, 0.7, 0.95])
    assert d["general_change"] == pytest.approx([-0.04, -0.1, 0.0])
    assert general_ability_change([1.0], 0.0) == [1.0]


def test_single_task_and_validation():
    m = cl_metrics([[0.7]], [0.1])
    assert (m.acc, m.bwt, m.fwt, m.forgetting, m.avg_forgetting) == (0.7, None, None, [], None)
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="base row"):
        forward_transfer(R, [0.1, 0.2])
    with pytest.raises(ValueError, match="general_base"):
        cl_metrics(R, general=[0.1, 0.2, 0.3])


def test_plot_writes_a_png_atomically(tmp_path):
    path = tmp_path / "plots" / "matrix.png"
    out = plot_accuracy_matrix([[0.8, float("nan")], [0.6, 0.9]], ["a", "b"], path)
    assert out == path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["matrix.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="task names"):
        plot_accuracy_matrix(R, ["a"], tmp_path / "x.png")
