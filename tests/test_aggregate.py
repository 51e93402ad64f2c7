from pathlib import Path

import numpy as np
import pytest

from fedstream.errors import JobFailed
from fedstream.workflows.aggregate import MetricAverage, WeightedAverage
from tests.helpers import PROC_STATUS, anonymous_mb


def test_weighted_average_is_exact_for_uneven_counts(tmp_path: Path) -> None:
    average = WeightedAverage(tmp_path)
    average.add({"w": np.full((2, 2), 1.0, np.float32), "n": np.array([10], np.int64)}, 1)
    average.add({"w": np.full((2, 2), 2.0, np.float32), "n": np.array([20], np.int64)}, 3)
    average.add({"w": np.full((2, 2), 4.0, np.float32), "n": np.array([31], np.int64)}, 4)
    result = average.result()
    # (1*1 + 3*2 + 4*4) / 8 = 23/8 = 2.875, exactly representable
    assert result["w"].dtype == np.float32
    np.testing.assert_array_equal(result["w"], np.full((2, 2), 2.875, np.float32))
    # integer arrays are rounded: (10 + 60 + 124) / 8 = 24.25 -> 24
    assert result["n"].dtype == np.int64 and result["n"].tolist() == [24]
    assert average.total_weight == 8 and average.count == 3
    with pytest.raises(ValueError, match="used already"):  # the means were made in place of the sums
        average.result()
    with pytest.raises(ValueError, match="used already"):
        average.add({"w": np.ones((2, 2), np.float32), "n": np.array([1], np.int64)}, 1)


def test_weighted_average_accumulates_in_float64(tmp_path: Path) -> None:
    average = WeightedAverage(tmp_path)
    big, small = np.array([1e8], np.float32), np.array([1.0], np.float32)
    average.add({"x": big}, 1)
    average.add({"x": small}, 1)
    assert average.result()["x"][0] == np.float32((1e8 + 1.0) / 2)


def test_weighted_average_rejects_mismatches(tmp_path: Path) -> None:
    average = WeightedAverage(tmp_path)
    average.add({"a": np.zeros(3)}, 1)
    with pytest.raises(ValueError, match=r"missing \['a'\], unexpected \['b'\]"):
        average.add({"b": np.zeros(3)}, 1)
    with pytest.raises(ValueError, match=r"'a' has shape \(4,\), expected \(3,\)"):
        average.add({"a": np.zeros(4)}, 1)
    with pytest.raises(ValueError, match="must be positive"):
        average.add({"a": np.zeros(3)}, 0)
    with pytest.raises(ValueError, match="no contributions"):
        WeightedAverage(tmp_path).result()


def test_metric_average_weights_each_key_by_who_reported_it() -> None:
    metrics = MetricAverage()
    metrics.add({"accuracy": 0.5, "loss": 2.0}, 100)
    metrics.add({"accuracy": 1.0}, 300)
    assert metrics.result() == {"accuracy": 0.875, "loss": 2.0}


def test_weighted_average_of_transposed_arrays(tmp_path: Path) -> None:
    # a state dict may hold non-contiguous tensors (a transposed view): every contribution still counts
    average = WeightedAverage(tmp_path)
    x = np.arange(6, dtype=np.float32).reshape(2, 3).T
    average.add({"x": x}, 1)
    average.add({"x": 2 * x}, 3)
    np.testing.assert_array_equal(average.result()["x"], 1.75 * x)


@pytest.mark.skipif(not PROC_STATUS.is_file(), reason="reads the process's memory in /proc")
def test_the_sums_wait_in_a_file_not_in_memory(tmp_path: Path) -> None:
    """The float64 sums are twice the model: they are kept in a temporary file, not in the server's memory."""
    model = {"w": np.arange(16 * 2**20, dtype=np.float32)}  # 64 MiB: its sums are 128 MiB
    scratch = tmp_path / "scratch"
    average = WeightedAverage(scratch)
    before = anonymous_mb()
    average.add(model, 1)
    average.add(model, 3)
    grown = anonymous_mb() - before
    assert np.array_equal(average.result()["w"], model["w"])
    assert grown < 16, f"the sums of a 64 MiB model took {grown:.0f} MB of memory"
    assert list(scratch.iterdir()) == []  # the file has no name, and is closed once the average is used


def test_an_average_that_cannot_keep_its_sums_fails_the_job_naming_the_folder(tmp_path: Path) -> None:
    taken = tmp_path / "models"
    taken.write_text("a file where the models folder would be")
    with pytest.raises(JobFailed, match=r"cannot keep the average's sums in .*models: \[Errno"):
        WeightedAverage(taken).add({"w": np.ones(3, np.float32)}, 1)
