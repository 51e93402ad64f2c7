"""Job configuration: the ``job.toml`` schema, overrides, and components resolved by import path."""

from fedstream.config.loader import JOB_FILE, Component, Job, load_job, load_job_data
from fedstream.config.schema import ClientConfig, ComponentConfig, ForwardConfig, JobConfig, ServerConfig

__all__ = [
    "JOB_FILE",
    "ClientConfig",
    "Component",
    "ComponentConfig",
    "ForwardConfig",
    "Job",
    "JobConfig",
    "ServerConfig",
    "load_job",
    "load_job_data",
]
