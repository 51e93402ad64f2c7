"""TrainerExecutor: what a Trainer returns is checked, and every mistake is named with the trainer and the call."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedstream.config import load_job
from fedstream.config.schema import ForwardConfig
from fedstream.errors import ConfigError
from fedstream.events import EventBus
from fedstream.messages import Payload, Task
from fedstream.pt.executor import TrainerExecutor
from fedstream.site.context import SiteContext
from fedstream.site.site import Site
from tests.helpers import write_job

TRAINERS = """
import sys

import torch

from fedstream import Trainer, TrainOutput, ValidationOutput


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


class Returns(Trainer):
    \"\"\"train and validate return ``train`` and ``validate`` evaluated as Python.\"\"\"

    def __init__(self, *, train="TrainOutput(1)", validate="ValidationOutput(1, {})", fail="") -> None:
        if fail == "init":
            raise RuntimeError("no GPU here")
        self.train_expr, self.validate_expr, self.fail = train, validate, fail

    def train(self, task):
        if self.fail == "exit":
            sys.exit(3)
        return eval(self.train_expr)

    def validate(self, task):
        return eval(self.validate_expr)
"""


def job(tmp_path: Path, args: str) -> Path:
    return write_job(
        tmp_path / "job",
        f"""
        name = "executor"
        [model]
        path = "returns.Net"
        [server.workflow]
        path = "fedstream.workflows.FedAvg"
        [server.workflow.args]
        min_clients = 1
        [client.trainer]
        path = "returns.Returns"
        [client.trainer.args]
        {args}
        """,
        {"returns.py": TRAINERS},
    )


def site(tmp_path: Path, args: str) -> Site:
    loaded = load_job(job(tmp_path, args))
    context = SiteContext("site-1", 0, 1, "executor", "id", tmp_path, EventBus(), logging.getLogger("site-1"))
    return Site(context, TrainerExecutor(loaded), lambda batch: None, ForwardConfig())


def answer(tmp_path: Path, args: str, kind: str = "train") -> str:
    task = Task("t1", "site-1", kind, 1, 1, Payload({"w": np.zeros(2, np.float32)}))
    result = site(tmp_path, args).handle(task)
    assert result.failure is not None, result
    assert result.failure.site == "site-1"
    return f"{result.failure.phase}: {result.failure.reason}"


@pytest.mark.parametrize(
    "args, kind, words",
    [
        ('train = "{}"', "train", "train: TypeError: Returns.train() must return a fedstream.TrainOutput, got dict {}"),
        ('train = "None"', "train", "must return a fedstream.TrainOutput, got NoneType None"),
        ('train = "TrainOutput(0)"', "train", "Returns.train(): num_samples must be from 1 to 1e+12, got 0"),
        ('train = "TrainOutput(-5)"', "train", "num_samples must be from 1"),
        ('train = "TrainOutput(10**30)"', "train", "num_samples must be from 1 to 1e+12, got 10000"),
        ('train = "TrainOutput(1.5)"', "train", "num_samples must be an int, got float 1.5"),
        ('train = "TrainOutput(True)"', "train", "num_samples must be an int, got bool True"),
        ("train = \"TrainOutput(1, {'acc': 'high'})\"", "train", "metric 'acc' must be a number, got str 'high'"),
        ('train = "TrainOutput(1, [1.0])"', "train", "metrics must be a dict of names to numbers, got list"),
        ('train = "TrainOutput(1, {3: 1.0})"', "train", "metric names must be str, got int 3"),
        ("validate = \"ValidationOutput(0, {'accuracy': 1.0})\"", "validate", "validate(): num_samples must be"),
        ('validate = "TrainOutput(1)"', "validate", "must return a fedstream.ValidationOutput, got TrainOutput"),
        ('fail = "exit"', "train", "train: the site's code called sys.exit(3)"),
        ('train = "TrainOutput(1, extra=[1])"', "train", "extra must be a dict of group names to arrays, got list"),
        (
            "train = \"TrainOutput(1, extra={'g': {'x': __import__('numpy').array(['a'])}})\"",
            "train",
            "TypeError: extra['g']['x'] has dtype <U1, which cannot be sent",
        ),
        ("", "evaluate", "a Trainer runs 'train' and 'validate' tasks, not 'evaluate'"),
    ],
)
def test_what_a_trainer_returns_is_checked(tmp_path: Path, args: str, kind: str, words: str) -> None:
    assert words in answer(tmp_path, args, kind)


def test_a_failed_call_is_logged_with_its_traceback_in_the_sites_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        answer(tmp_path, 'train = "{}"')
    assert "train in round 1 failed" in caplog.text and "Traceback" in caplog.text


def test_weights_that_do_not_fit_the_model_are_named(tmp_path: Path) -> None:
    task = Task("t1", "site-1", "train", 1, 1, Payload({"v": np.zeros(2, np.float32)}))
    result = site(tmp_path, "").handle(task)
    assert result.failure is not None and "Missing key(s) in state_dict" in result.failure.reason


def test_a_trainer_whose_constructor_raises_is_a_located_config_error(tmp_path: Path) -> None:
    loaded = load_job(job(tmp_path, 'fail = "init"'))
    with pytest.raises(ConfigError) as caught:
        loaded.component("client.trainer").build(object)
    assert caught.value.key == "client.trainer.args"
    assert "Returns(...) raised RuntimeError: no GPU here" in str(caught.value)
