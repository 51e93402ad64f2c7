"""The simulator: the server in this process, the sites in worker processes, connected by pipes."""
