"""Server workflows: what the server asks of the sites, round after round."""

from fedstream.workflows.base import RoundSummary, Workflow
from fedstream.workflows.fedavg import FedAvg

__all__ = ["FedAvg", "RoundSummary", "Workflow"]
