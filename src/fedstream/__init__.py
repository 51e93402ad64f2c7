"""fedstream: federated averaging on PyTorch, with experiment tracking streamed from every site to the server.

The names here are the public API; everything else may change.
"""

from fedstream.errors import ConfigError, DataError, FedstreamError, JobFailed, TrackingError, TransportError
from fedstream.pt.trainer import TaskInfo, Trainer, TrainOutput, ValidationOutput
from fedstream.site.context import SiteContext, current_site

__version__ = "0.1.0"

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
]
