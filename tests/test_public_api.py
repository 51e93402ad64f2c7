"""The public surface: what `import fedstream` offers, and what a site must not need."""

import ast
import functools
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import tomllib

import fedstream
import fedstream.tracking
from tests.helpers import REPO


def test_public_names_are_all_exported() -> None:
    public = sorted(name for name in dir(fedstream) if not name.startswith("_") or name == "__version__")
    public = [name for name in public if not isinstance(getattr(fedstream, name), type(sys))]  # not submodules
    assert set(fedstream.__all__) == set(public)
    assert fedstream.tracking.__all__ == [
        "MLflowReceiver",
        "MLflowWriter",
        "SummaryWriter",
        "TensorBoardReceiver",
        "WandBWriter",
    ]


def test_sites_need_neither_mlflow_nor_tensorboard() -> None:
    code = (
        "import sys; import fedstream.tracking, fedstream.site.host; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard')); "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_command_line_does_not_load_pytorch_to_show_its_help() -> None:
    code = (
        "import sys; from fedstream.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow', 'pydantic', 'numpy'))\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement such as ``"tomli>=2; python_version < '3.11'"``."""
    match = re.match(r"[A-Za-z0-9_.\-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def _imports(file: Path) -> dict[str, set[str]]:
    """The third-party modules ``file`` imports, each with the distributions installed here that provide it
    (``mlflow``: mlflow, mlflow-skinny, ...)."""
    modules: list[str] = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    tops = {module.split(".")[0] for module in modules} - set(sys.stdlib_module_names) - {"fedstream"}
    providers = _providers()
    return {top: {_distribution(name) for name in providers.get(top, [top])} for top in tops}


@functools.cache
def _providers() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def test_every_library_the_package_imports_is_a_declared_dependency() -> None:
    # A site installs plain `pip install fedstream`; only the server adds fedstream[tracking]. Whatever the
    # package imports outside tracking/ must come with the plain install (grpcio and cryptography did not:
    # they came only through tensorboard and mlflow, so `fedstream client start` failed on a bare site).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_distribution(requirement) for requirement in project["dependencies"]}
    tracking = core | {_distribution(requirement) for requirement in project["optional-dependencies"]["tracking"]}
    package = REPO / "src" / "fedstream"
    undeclared, used = [], set()
    for file in sorted(package.rglob("*.py")):
        where = file.relative_to(package)
        if where.parts[0] == "templates":  # users' job code, not the package's
            continue
        allowed = tracking if where.parts[0] == "tracking" else core
        for module, providers in _imports(file).items():
            used |= providers
            if not providers & allowed:
                undeclared.append(f"{where}: {module} (from {', '.join(sorted(providers))})")
    assert not undeclared, undeclared
    assert core - used <= {"tomli"}, f"declared but never imported: {sorted(core - used)}"  # tomli: Python 3.10
