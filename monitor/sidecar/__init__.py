"""The sidecar: one view over every worker process's pools, joined with PostgreSQL's own.

Workers write snapshot files (`monitor.exporters.snapshot`); the sidecar reads them
(never writes there), merges them (`aggregate`, `merge`), polls PostgreSQL on its own
schedule (`postgres`), and serves `/metrics`, a JSON API and a live page (`app`).
Run it with `pool-monitor sidecar --help`.
"""
