"""Reference trainers and models used by the jobs in ``jobs/``."""
