"""The public surface: what `import fedstream` offers, and what a site must not need."""

import subprocess
import sys

import fedstream
import fedstream.tracking


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
