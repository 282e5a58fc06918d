"""Variables and label filters shared by the dashboards.

Why: the same four selectors (namespace, job, service, pool) appear in almost every query;
spelling them once keeps every panel filterable the same way.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from dashboards import series as s
from dashboards.panels import Q, datasource_variable, query_variable

#: Shown next to each dashboard's title in the dashboard list, and used for the links bar.
TAGS = ("pool-monitor",)

#: A series every instrumented pool exports (even NullPool), so variables list every pool.
_ANCHOR = s.m("db.client.connection.count")


def target_filter() -> str:
    """`namespace`, `job` and `service` filters (all regexes; "All" is `.*`)."""
    return ", ".join(f'{label}=~"${label}"' for label in s.TARGET_LABELS)


def pool_filter(*extra: str) -> str:
    """Target filters plus the pool filter, plus any `extra` matchers."""
    return ", ".join((target_filter(), f'{s.POOL}=~"$pool"', *extra))


def pool_variables() -> list[db.QueryVariable | db.DatasourceVariable]:
    """datasource, namespace, job, service, pool — each narrowing the next."""
    return [
        datasource_variable(),
        query_variable(
            "namespace",
            "Namespace",
            f"label_values({_ANCHOR}, namespace)",
            "Kubernetes namespace of the scraped service (All outside Kubernetes).",
        ),
        query_variable(
            "job",
            "Job",
            f'label_values({_ANCHOR}{{namespace=~"$namespace"}}, job)',
            "Prometheus scrape job.",
        ),
        query_variable(
            "service",
            "Service",
            f'label_values({_ANCHOR}{{namespace=~"$namespace", job=~"$job"}}, service)',
            "Kubernetes service (All outside Kubernetes).",
        ),
        query_variable(
            "pool",
            "Pool",
            f"label_values({_ANCHOR}{{{target_filter()}}}, {s.POOL})",
            "SQLAlchemy pool, as named by monitor.instrument(engine, pool_name=...).",
        ),
    ]


def target_variables(anchor: str) -> list[db.QueryVariable | db.DatasourceVariable]:
    """datasource, namespace, job, service over another anchor series (e.g. `pg_up`)."""
    return [
        datasource_variable(),
        query_variable(
            "namespace",
            "Namespace",
            f"label_values({anchor}, namespace)",
            "Kubernetes namespace of the scraped service (All outside Kubernetes).",
        ),
        query_variable(
            "job",
            "Job",
            f'label_values({anchor}{{namespace=~"$namespace"}}, job)',
            "Prometheus scrape job.",
        ),
        query_variable(
            "service",
            "Service",
            f'label_values({anchor}{{namespace=~"$namespace", job=~"$job"}}, service)',
            "Kubernetes service (All outside Kubernetes).",
        ),
    ]


def lbl(*labels: str) -> str:
    """A Grafana legend naming series by labels: `lbl("a", "b")` -> `{{a}} {{b}}`."""
    return " ".join("{{" + label + "}}" for label in labels)


def exemplar_quantile(otel_name: str, quantile: str, matchers: str, legend: str) -> Q:
    """The `quantile` of a pool histogram per pool, straight from its `_bucket` series over
    `$__rate_interval`, with exemplars on: Grafana draws each exemplar as a dot (one traced
    checkout: its value and time) whose `trace_id` links to the trace.

    Why not the recording rules the other lines read: Prometheus stores exemplars only with
    scraped series, so `pool:..._bucket:rate5m` and `...:quantile_rate5m` carry none."""
    return Q(
        f"histogram_quantile({quantile}, sum by ({s.POOL}, le) "
        f"(rate({s.bucket(otel_name)}{{{matchers}}}[$__rate_interval])))",
        legend,
        exemplar=True,
    )
