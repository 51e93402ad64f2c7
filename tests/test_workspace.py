"""The workspace: safe site names, and re-runs that never remove anything outside the workspace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedstream.errors import ConfigError
from fedstream.workspace import MARKER, RESULT, Workspace, check_site_name, check_site_names, exclusive
from tests.helpers import run_cli

BAD_SITE_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "a/b",
    "a\\b",
    "/abs",
    "~",
    "-leading-dash",
    ".hidden",
    "server",
    "SERVER",
    "result.json",
    "Result.JSON",
    "log.txt",
    "jobs",
    "x" * 65,
    "site 1",
    "site\n1",
    "sïte",
    "a:b",
    "a*b",
    "$HOME",
]


@pytest.mark.parametrize("name", BAD_SITE_NAMES)
def test_unsafe_site_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="site name"):
        check_site_name(name)


def test_safe_site_names_pass() -> None:
    for name in ("site-1", "a", "Hospital_A.east", "x" * 64, "7"):
        assert check_site_name(name) == name


def test_site_names_are_unique_ignoring_case() -> None:
    with pytest.raises(ValueError, match="repeated: site-1/SITE-1"):
        check_site_names(["site-1", "SITE-1"])


def test_a_listed_entry_outside_the_workspace_is_never_removed(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.txt").write_text("keep me too")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "old-site").mkdir()
    os.symlink(outside, ws / "linked")
    # a marker written by an older fedstream, or edited by hand
    (ws / MARKER).write_text("\n".join(["..", ".", "../precious.txt", str(outside), "linked", "old-site"]) + "\n")
    Workspace.prepare(ws, ["site-1"])
    assert precious.read_text() == "keep me"
    assert (outside / "data.txt").read_text() == "keep me too"
    assert not (ws / "linked").exists() and not (ws / "linked").is_symlink()
    assert not (ws / "old-site").exists()
    assert (ws / "site-1").is_dir()


def test_cli_refuses_dot_dot_as_a_site_and_touches_nothing(tmp_path: Path) -> None:
    (tmp_path / "neighbour.txt").write_text("keep me")
    ws = tmp_path / "ws"
    done = run_cli("simulate", "jobs/hello-pt", "-w", str(ws), "-c", "..,b")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "-c" in done.stderr and "bad site name '..'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not ws.exists() and (tmp_path / "neighbour.txt").read_text() == "keep me"


@pytest.mark.parametrize("names", ["", ",", "a,,b", "a,A"])
def test_cli_refuses_empty_or_repeated_site_names(tmp_path: Path, names: str) -> None:
    done = run_cli("simulate", "jobs/hello-pt", "-w", str(tmp_path / "ws"), "-c", names)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: -c:" in done.stderr and "Traceback" not in done.stderr


def test_workspace_refuses_unsafe_site_names_itself(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad site name"):
        Workspace.prepare(tmp_path / "ws", [".."])
    with pytest.raises(ValueError):
        Workspace(tmp_path).site("../x")


def test_a_file_as_workspace_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        Workspace.prepare(tmp_path / "file", ["a"])


def test_a_simulation_on_a_folder_in_use_stops_before_touching_it(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    Workspace.prepare(ws, ["site-1"])
    (ws / RESULT).write_text("{}")  # the running one's
    with exclusive(ws, "fedstream simulate"):
        done = run_cli("simulate", "jobs/hello-pt", "-w", str(ws), "-n", "2")
        with pytest.raises(ConfigError, match=r"in use by fedstream simulate \(pid \d+\)"), exclusive(ws, "x"):
            pass
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"in use by fedstream simulate (pid {os.getpid()})" in done.stderr and "Traceback" not in done.stderr
    assert (ws / RESULT).read_text() == "{}", "nothing cleaned"
    with exclusive(ws, "fedstream simulate"):  # free again once the holder let it go
        pass
