"""fedstream: federated averaging on PyTorch, with experiment tracking streamed from every site to the server.

The names here are the public API; everything else may change. They are imported on first use, so that
``import fedstream`` (and the ``fedstream`` command) does not load PyTorch until something needs it.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING, Any as _Any

if _TYPE_CHECKING:
    from fedstream.errors import ConfigError, DataError, FedstreamError, JobFailed, TrackingError, TransportError
    from fedstream.pt.trainer import TaskInfo, Trainer, TrainOutput, ValidationOutput
    from fedstream.site.context import SiteContext, current_site
    from fedstream.tracking.writers import mlflow

__version__ = "0.1.0"

_WHERE = {
    "ConfigError": "fedstream.errors",
    "DataError": "fedstream.errors",
    "FedstreamError": "fedstream.errors",
    "JobFailed": "fedstream.errors",
    "TrackingError": "fedstream.errors",
    "TransportError": "fedstream.errors",
    "TaskInfo": "fedstream.pt.trainer",
    "Trainer": "fedstream.pt.trainer",
    "TrainOutput": "fedstream.pt.trainer",
    "ValidationOutput": "fedstream.pt.trainer",
    "SiteContext": "fedstream.site.context",
    "current_site": "fedstream.site.context",
    "mlflow": "fedstream.tracking.writers",
}

__all__ = [
    "ConfigError",
    "DataError",
    "FedstreamError",
    "JobFailed",
    "SiteContext",
    "TaskInfo",
    "TrackingError",
    "TrainOutput",
    "Trainer",
    "TransportError",
    "ValidationOutput",
    "__version__",
    "current_site",
    "mlflow",
]


def __getattr__(name: str) -> _Any:
    if name in _WHERE:
        value = getattr(_importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedstream' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
