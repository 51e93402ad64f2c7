"""Bad job configs are reported with the file and the dotted key, before anything runs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fedstream.config import load_job
from fedstream.errors import ConfigError
from fedstream.simulator.simulate import check, site_names
from tests.helpers import REPO, run_cli, write_job

GOOD = """
name = "cfg"
[model]
path = "fedstream.examples.hello_pt.SimpleNetwork"
[server.workflow]
path = "fedstream.workflows.FedAvg"
[server.workflow.args]
num_rounds = 2
min_clients = 2
[client.trainer]
path = "fedstream.examples.hello_pt.HelloPTTrainer"
[client.trainer.args]
lr = 0.01
[client.trainer.args.data]
partition = "iid"
"""


def job_with(
    tmp_path: Path, replace: tuple[str, str] = ("", ""), append: str = "", files: dict[str, str] | None = None
) -> Path:
    text = GOOD.replace(*replace) if replace[0] else GOOD
    return write_job(tmp_path / "job", text + textwrap.dedent(append), files)


def error_of(job: Path, overrides: tuple[str, ...] = (), sites: int = 2, threads: int = 2) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        loaded = load_job(job, overrides)
        check(loaded, site_names(sites), threads)
    return caught.value


CASES = [
    # (id, how to break the good config, expected key, expected words)
    (
        "unknown-top-level-key",
        dict(replace=('name = "cfg"', 'name = "cfg"\ncolour = "red"')),
        "colour",
        "unknown key",
    ),
    (
        "unknown-workflow-arg",
        dict(replace=("num_rounds = 2", "num_round = 2")),
        "server.workflow.args.num_round",
        "unknown key",
    ),
    (
        "wrong-type",
        dict(replace=("num_rounds = 2", 'num_rounds = "2"')),
        "server.workflow.args.num_rounds",
        "valid integer",
    ),
    (
        "bool-is-not-int",
        dict(replace=("num_rounds = 2", "num_rounds = true")),
        "server.workflow.args.num_rounds",
        "valid integer",
    ),
    (
        "missing-trainer",
        dict(
            replace=(
                '[client.trainer]\npath = "fedstream.examples.hello_pt.HelloPTTrainer"\n',
                "[client.trainer]\n",
            )
        ),
        "client.trainer.path",
        "missing required key",
    ),
    (
        "no-such-module",
        dict(replace=("fedstream.workflows.FedAvg", "fedstream.nowhere.FedAvg")),
        "server.workflow.path",
        "cannot import module 'fedstream.nowhere'",
    ),
    (
        "no-such-class",
        dict(replace=("fedstream.workflows.FedAvg", "fedstream.workflows.FedAvgg")),
        "server.workflow.path",
        "has no 'FedAvgg'",
    ),
    (
        "not-a-class",
        dict(replace=("fedstream.workflows.FedAvg", "fedstream.simulator.simulate.site_names")),
        "server.workflow.path",
        "not a class",
    ),
    (
        "not-a-workflow",
        dict(replace=("fedstream.workflows.FedAvg", "fedstream.examples.hello_pt.SimpleNetwork")),
        "server.workflow.path",
        "SimpleNetwork is not a fedstream.workflows.base.Workflow",
    ),
    (
        "bad-import-path",
        dict(replace=("fedstream.workflows.FedAvg", "FedAvg")),
        "server.workflow.path",
        "import path",
    ),
    (
        "constructor-rejects-value",
        dict(replace=("lr = 0.01", "lr = -1.0")),
        "client.trainer.args",
        "lr must be positive",
    ),
    (
        "bad-literal",
        dict(replace=('partition = "iid"', 'partition = "random"')),
        "client.trainer.args.data.partition",
        "'full', 'iid' or 'dirichlet'",
    ),
    (
        "unknown-nested-key",
        dict(replace=('partition = "iid"', "partitions = 3")),
        "client.trainer.args.data.partitions",
        "unknown key",
    ),
    (
        "fraction-out-of-range",
        dict(append="", replace=("min_clients = 2", "min_clients = 2\nclients_per_round = 1.5")),
        "server.workflow.args.clients_per_round",
        "(0, 1]",
    ),
    (
        "count-below-min",
        dict(replace=("min_clients = 2", "min_clients = 2\nclients_per_round = 1")),
        "server.workflow.args.clients_per_round",
        "cannot satisfy min_clients",
    ),
    (
        "bad-stop-condition",
        dict(replace=("min_clients = 2", 'min_clients = 2\nstop_condition = "accuracy is high"')),
        "server.workflow.args.stop_condition",
        "<metric> <op> <number>",
    ),
    (
        "negative-timeout",
        dict(replace=("min_clients = 2", "min_clients = 2\ntask_timeout_s = -1.0")),
        "server.workflow.args.task_timeout_s",
        "0 or more",
    ),
    (
        "reserved-event-name",
        dict(append='[client.forward]\nevents = ["analytics", "task"]\nprefix = "fedstream."\n'),
        "client.forward",
        "fedstream's own task marker",
    ),
    (
        "bad-receiver-path",
        dict(append='[server.receivers.tb]\npath = "fedstream.nowhere.Receiver"\n'),
        "server.receivers.tb.path",
        "cannot import",
    ),
]


@pytest.mark.parametrize("change, key, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_names_file_and_key(tmp_path: Path, change: dict, key: str, words: str) -> None:
    job = job_with(tmp_path, **change)
    error = error_of(job)
    assert error.file == str(job / "job.toml")
    assert error.key == key
    assert words in error.message
    assert str(error).startswith(f"{job / 'job.toml'}: {key}: ")


def test_numbers_that_are_not_finite_are_refused_wherever_they_are(tmp_path: Path) -> None:
    job = job_with(tmp_path, ("lr = 0.01", "lr = inf"))
    error = error_of(job)
    assert (error.file, error.key) == (str(job / "job.toml"), "client.trainer.args.lr")
    assert "inf is not a finite number" in error.message
    error = error_of(job_with(tmp_path), ("server.workflow.args.task_timeout_s=nan",))
    assert error.file == f"{tmp_path / 'job' / 'job.toml'} (--set)"
    assert error.key == "server.workflow.args.task_timeout_s"
    error = error_of(job_with(tmp_path), ("client.trainer.args.anything=[1.0, -inf]",))
    assert error.key == "client.trainer.args.anything[1]" and "-inf is not a finite number" in error.message


def test_min_clients_above_the_number_of_sites(tmp_path: Path) -> None:
    error = error_of(job_with(tmp_path), sites=1)
    assert (error.key, error.file) == ("server.workflow.args.min_clients", str(tmp_path / "job" / "job.toml"))
    assert "2 sites must answer each round but the job has 1" in error.message


def test_threads_below_one(tmp_path: Path) -> None:
    error = error_of(job_with(tmp_path), threads=0)
    assert error.key == "-t" and "at least 1" in error.message


def test_override_errors_say_they_came_from_set(tmp_path: Path) -> None:
    job = job_with(tmp_path)
    error = error_of(job, ("client.trainer.args.lr=fast",))
    assert error.file == f"{job / 'job.toml'} (--set)"
    assert error.key == "client.trainer.args.lr" and "'fast'" in error.message
    error = error_of(job, ("server.workflow.args.rounds=3",))
    assert error.key == "server.workflow.args.rounds" and "unknown key" in error.message
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_job(job, ("server.workflow.args.num_rounds",))
    with pytest.raises(ConfigError, match="'name' is a str, not a table"):
        load_job(job, ("name.x=1",))
    error = error_of(job, ("server.receivers.tb.args.folder=x",))  # a table the job does not have
    assert error.file == f"{job / 'job.toml'} (--set)"
    assert error.key == "server.receivers.tb.path" and "missing" in error.message


def test_toml_syntax_error_and_missing_folder(tmp_path: Path) -> None:
    job = write_job(tmp_path / "broken", "name = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_job(job)
    assert caught.value.file == str(job / "job.toml")
    with pytest.raises(ConfigError, match="no such job folder"):
        load_job(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no job\.toml"):
        load_job(tmp_path / "empty")


def test_client_names_are_checked() -> None:
    assert site_names(3) == ["site-1", "site-2", "site-3"]
    assert site_names(names=["a", "b"]) == ["a", "b"]
    with pytest.raises(ConfigError, match="repeated: a"):
        site_names(names=["a", "b", "a"])
    with pytest.raises(ConfigError, match="it is reserved"):
        site_names(names=["server"])
    with pytest.raises(ConfigError, match="at least 1"):
        site_names(0)


def test_overrides_are_typed_values(tmp_path: Path) -> None:
    job = load_job(
        job_with(tmp_path),
        (
            "server.workflow.args.num_rounds=7",
            "client.trainer.args.data.root=/data/x",
            "client.trainer.args.lr=0.5",
            'server.workflow.args.stop_condition="loss < 1"',
        ),
    )
    args = job.to_dict()
    assert args["server"]["workflow"]["args"]["num_rounds"] == 7
    assert args["server"]["workflow"]["args"]["stop_condition"] == "loss < 1"
    assert args["client"]["trainer"]["args"]["data"]["root"] == "/data/x"
    assert args["client"]["trainer"]["args"]["lr"] == 0.5


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    """``job show`` writes every default; loading that output gives the same job."""
    shown = run_cli("job", "show", str(REPO / "jobs" / "hello-pt"), "--set", "server.workflow.args.num_rounds=4")
    assert shown.returncode == 0, shown.stderr
    assert "wait_after_min_clients_s = 10.0" in shown.stdout and "max_train_samples = 0" in shown.stdout
    copy = write_job(tmp_path / "copy", shown.stdout)
    again = run_cli("job", "show", str(copy))
    assert again.stdout == shown.stdout
    assert (
        load_job(copy).to_dict()
        == load_job(REPO / "jobs" / "hello-pt", ("server.workflow.args.num_rounds=4",)).to_dict()
    )


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    job = job_with(tmp_path, replace=("num_rounds = 2", "num_rounds = 0"))
    done = run_cli("simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "2")
    assert done.returncode == 2
    assert f"{job / 'job.toml'}: server.workflow.args.num_rounds: must be at least 1, got 0" in " ".join(
        done.stderr.split()
    )
    assert not (tmp_path / "ws").exists(), "nothing is written before the config is valid"


def test_job_imports_its_own_modules(tmp_path: Path) -> None:
    job = job_with(
        tmp_path,
        replace=("fedstream.examples.hello_pt.SimpleNetwork", "my_net.Net"),
        files={
            "my_net.py": """
            import torch

            class Net(torch.nn.Linear):
                def __init__(self, width: int = 3):
                    super().__init__(width, 2)
            """
        },
    )
    loaded = load_job(job, ("model.args.width=5",))
    assert loaded.component("model").cls.__name__ == "Net"
    assert loaded.to_dict()["model"]["args"] == {"width": 5}
