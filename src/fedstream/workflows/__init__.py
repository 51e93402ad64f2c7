"""Server workflows: what the server asks of the sites, round after round."""

from fedstream.workflows.base import RoundSummary, Workflow
from fedstream.workflows.cross_site import CrossSiteEval
from fedstream.workflows.fedavg import FedAvg
from fedstream.workflows.fedopt import FedOpt
from fedstream.workflows.fedprox import FedProx
from fedstream.workflows.scaffold import Scaffold

__all__ = ["CrossSiteEval", "FedAvg", "FedOpt", "FedProx", "RoundSummary", "Scaffold", "Workflow"]
