"""Experiment tracking: writers on the sites, receivers on the server.

Writers (``MLflowWriter``, ``SummaryWriter``, ``WandBWriter``) need neither mlflow nor tensorboard; the
receivers import them only when a job starts.
"""

from fedstream.tracking.mlflow_receiver import MLflowReceiver
from fedstream.tracking.tensorboard_receiver import TensorBoardReceiver
from fedstream.tracking.writers import MLflowWriter, SummaryWriter, WandBWriter

__all__ = ["MLflowReceiver", "MLflowWriter", "SummaryWriter", "TensorBoardReceiver", "WandBWriter"]
