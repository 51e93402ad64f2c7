"""``fedstream new``: job folders from the templates shipped inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedstream.cli.new import templates
from tests.helpers import REPO, run_cli


def test_the_repository_jobs_are_the_templates() -> None:
    assert (REPO / "jobs").resolve() == (REPO / "src" / "fedstream" / "templates").resolve()
    assert {"hello-pt", "hello-pt-mlflow", "hello-pt-mlflow-script", "hello-pt-tb-mlflow"} <= set(templates())


@pytest.mark.parametrize("template", templates())
def test_every_template_makes_a_job_that_loads(tmp_path: Path, template: str) -> None:
    done = run_cli("new", str(tmp_path / "job"), "--template", template)
    assert done.returncode == 0, done.stderr
    assert f"fedstream simulate {tmp_path / 'job'}" in done.stdout
    shown = run_cli("job", "show", str(tmp_path / "job"))  # its own process: each job has its own modules
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == run_cli("job", "show", str(REPO / "jobs" / template)).stdout
    assert not (tmp_path / "job" / "__pycache__").exists()


def test_new_never_overwrites_and_names_the_templates(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    done = run_cli("new", str(tmp_path / "taken"))
    assert done.returncode == 2 and "already exists and is not an empty folder" in done.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    done = run_cli("new", str(tmp_path / "other"), "--template", "nope")
    assert done.returncode == 2 and "the templates are cifar10-hetero, hello-pt, " in done.stderr
    assert not (tmp_path / "other").exists()
    done = run_cli("new", str(tmp_path / "taken" / "notes.txt" / "job"))  # under a file: cannot be made
    assert done.returncode == 2 and "job: cannot write the job folder here: Not a directory" in done.stderr


def test_the_wheel_ships_the_templates(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("fedstream-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in templates():
        for path in (REPO / "jobs" / template).iterdir():
            if path.suffix in (".toml", ".py"):
                assert f"fedstream/templates/{template}/{path.name}" in names
