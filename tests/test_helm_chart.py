"""The Helm chart, rendered and linted by Helm's own Go library (helm-python-sdk).

Every rendered object is checked against the Kubernetes schemas of the newest version
kubernetes-validate knows (strict: unknown fields fail). The Prometheus Operator's objects
(PodMonitor, PrometheusRule) are CRDs without schemas there, so their content is asserted
directly: the rules must equal `dashboards.render_rules(...)` with the same overrides, and
the dashboards ConfigMaps must hold `dashboards/json/*.json` byte for byte.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is a dev dependency")
kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a dev dependency")
from kubernetes_validate.utils import latest_version  # noqa: E402

from dashboards import render_rules  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELM_DIR = ROOT / "helm"
CHART = HELM_DIR / "pool-monitor"
EXAMPLE = HELM_DIR / "examples" / "my-service"
DASHBOARD_JSON = ROOT / "dashboards" / "json"
RULES = ROOT / "dashboards" / "rules"
KUBE_VERSION = latest_version()
CRD_GROUP = "monitoring.coreos.com/"

Obj = dict[str, Any]

EVERYTHING: dict[str, Any] = {
    "podMonitor": {
        "enabled": True,
        "labels": {"release": "kube-prometheus-stack"},
        "annotations": {"team": "db"},
        "interval": "15s",
        "metricRelabelings": [{"action": "labeldrop", "regex": "otel_scope_.*"}],
    },
    "prometheusRule": {
        "enabled": True,
        "labels": {"release": "kube-prometheus-stack"},
        "additionalRuleLabels": {"team": "payments"},
    },
    "dashboards": {"enabled": True, "annotations": {"grafana_folder": "Databases"}},
    "postgresql": {"persistence": {"enabled": True, "storageClass": "fast"}},
    "demo": {
        "replicaCount": 2,
        "extraEnv": [{"name": "LOG_LEVEL", "value": "debug"}],
        "podAnnotations": {"example.com/owner": "db-team"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
    },
    "sidecar": {
        "showQueryText": True,
        "extraArgs": ["--scan-interval=2"],
        "traceUrlTemplate": "https://tempo.example/trace/{trace_id}",
    },
    "imagePullSecrets": [{"name": "regcred"}],
}

EXTERNAL_DSN: dict[str, Any] = {
    "postgresql": {"enabled": False},
    "database": {"existingSecret": "orders-db", "secretKey": "url"},
    "sidecar": {"postgres": {"existingSecret": "orders-db-monitor", "secretKey": "dsn"}},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
}

VARIANTS = {"defaults": None, "everything": EVERYTHING, "external-dsn": EXTERNAL_DSN}


# --------------------------------------------------------------------------- helpers


def render_text(
    values: dict[str, Any] | None = None, chart: Path = CHART, name: str = "demo"
) -> dict[str, str]:
    with helm.Chart.load(chart) as loaded:
        return loaded.render(values, name=name, namespace="pm")


def render(
    values: dict[str, Any] | None = None, chart: Path = CHART, name: str = "demo"
) -> list[Obj]:
    """Every object the chart renders with `values` (NOTES.txt left out)."""
    objects: list[Obj] = []
    for path, text in render_text(values, chart, name).items():
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def one(objects: list[Obj], kind: str, name_part: str = "") -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_part)]
    assert len(found) == 1, (
        f"expected one {kind} *{name_part}, got {[o['metadata'] for o in found]}"
    )
    return found[0]


def kinds(objects: list[Obj]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def container(workload: Obj, name: str) -> Obj:
    spec = pod_spec(workload)
    for c in spec["containers"] + spec.get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in {workload['metadata']['name']}")


def volume(workload: Obj, name: str) -> Obj:
    return next(v for v in pod_spec(workload)["volumes"] if v["name"] == name)


def mount(c: Obj, name: str) -> Obj:
    return next(m for m in c["volumeMounts"] if m["name"] == name)


def validate_kubernetes(objects: list[Obj]) -> None:
    """Strict schema validation of every built-in object; CRDs must be the operator's."""
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUP):
            assert obj["kind"] in ("PodMonitor", "PrometheusRule"), obj["kind"]
            continue
        try:
            kv.validate(obj, KUBE_VERSION, strict=True)
        except kv.ValidationError as exc:  # pragma: no cover - the message is the point
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


def lint_problems(chart: Path, values: dict[str, Any] | None = None, **kw: Any) -> list[Obj]:
    """Lint findings of severity warning or error (strict mode fails on both)."""
    report = helm.lint(chart, values, strict=True, namespace="pm", **kw)
    return [m for m in report["messages"] if m["severity"] >= 2] + [
        {"error": e} for e in report["errors"]
    ]


def committed_rule_groups() -> list[Obj]:
    return [
        g
        for name in ("recording.yml", "alerts.yml")
        for g in yaml.safe_load((RULES / name).read_text())["groups"]
    ]


def rendered_rule_groups(**overrides: Any) -> list[Obj]:
    files = render_rules(**overrides)
    return [
        g for name in ("recording.yml", "alerts.yml") for g in yaml.safe_load(files[name])["groups"]
    ]


def rule_values(**rule: Any) -> dict[str, Any]:
    return {"prometheusRule": {"enabled": True, **rule}}


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lints_renders_and_validates(variant: str) -> None:
    values = VARIANTS[variant]
    assert lint_problems(CHART, values) == []
    objects = render(values)
    validate_kubernetes(objects)
    expected = {
        "defaults": [
            "Deployment",
            "Secret",
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
            "StatefulSet",
        ],
        "everything": ["ConfigMap"] * 4
        + [
            "Deployment",
            "PodMonitor",
            "PrometheusRule",
            "Secret",
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
            "StatefulSet",
        ],
        "external-dsn": [
            "Deployment",
            "PodMonitor",
            "PrometheusRule",
            "Secret",
            "Service",
            "ServiceAccount",
        ],
    }[variant]
    assert kinds(objects) == expected


def test_image_tag_is_the_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert str(values["image"]["tag"]) == str(chart["appVersion"])
    sidecar = container(one(render(), "Deployment", "demo"), "pool-monitor")
    assert sidecar["image"] == f"ghcr.io/pool-monitor/pool-monitor:{chart['appVersion']}"


# --------------------------------------------------------------------------- the pod


def test_shared_snapshot_volume_is_memory_with_limit_and_read_only_in_sidecar() -> None:
    demo = one(render(), "Deployment", "demo")
    snapshots = volume(demo, "pool-monitor-snapshots")
    assert snapshots["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Mi"}
    app, sidecar = container(demo, "demo"), container(demo, "pool-monitor")
    app_mount, sidecar_mount = (
        mount(app, "pool-monitor-snapshots"),
        mount(sidecar, "pool-monitor-snapshots"),
    )
    assert app_mount["mountPath"] == sidecar_mount["mountPath"] == "/run/pool-monitor"
    assert not app_mount.get("readOnly", False)
    assert sidecar_mount["readOnly"] is True
    env = {e["name"]: e for e in app["env"]}
    assert env["POOL_MONITOR_SNAPSHOT_DIR"]["value"] == "/run/pool-monitor"
    assert "--snapshot-dir=/run/pool-monitor" in sidecar["args"]


def test_snapshot_volume_on_disk_and_own_size() -> None:
    demo = one(render({"snapshots": {"medium": "", "sizeLimit": "8Mi"}}), "Deployment", "demo")
    assert volume(demo, "pool-monitor-snapshots")["emptyDir"] == {"sizeLimit": "8Mi"}


def test_app_start_wipes_stale_snapshots() -> None:
    app = container(one(render(), "Deployment", "demo"), "demo")
    command = app["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    assert "rm -f -- /run/pool-monitor/pool-monitor-*.json" in command[2]
    assert "/run/pool-monitor/pool-monitor-*.live " in command[2]
    assert "/run/pool-monitor/pool-monitor-*.board;" in command[2]
    assert command[2].endswith('exec "$@"')
    assert app["args"][:2] == ["uvicorn", "demo_app.service:create_app"]


def test_sidecar_probes_ports_and_resources() -> None:
    demo = one(render(), "Deployment", "demo")
    sidecar = container(demo, "pool-monitor")
    assert sidecar["ports"] == [{"name": "pool-monitor", "containerPort": 9187, "protocol": "TCP"}]
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "pool-monitor"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "pool-monitor"}
    assert sidecar["livenessProbe"]["periodSeconds"] == 10
    for c in pod_spec(demo)["containers"] + pod_spec(demo)["initContainers"]:
        assert set(c["resources"]) == {"requests", "limits"}, c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]
    service = one(render(), "Service", "demo")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "http": "http",
        "pool-monitor": "pool-monitor",
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_security_context_everywhere(variant: str) -> None:
    objects = render(VARIANTS[variant])
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for workload in workloads:
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc.get("runAsNonRoot", True) is True, where
            assert "privileged" not in sc, where
    for account in (o for o in objects if o["kind"] == "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    sidecar = container(one(objects, "Deployment", "demo"), "pool-monitor")
    assert sidecar["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dsn_comes_from_a_secret_never_in_clear(variant: str) -> None:
    texts = render_text(VARIANTS[variant])
    objects = render(VARIANTS[variant])
    for path, text in texts.items():
        if not path.endswith("-secret.yaml"):
            assert "postgresql://" not in text, path
    demo = one(objects, "Deployment", "demo")
    app_env = {e["name"]: e for e in container(demo, "demo")["env"]}
    ref = app_env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    sidecar = container(demo, "pool-monitor")
    assert "--postgres-dsn-file=/etc/pool-monitor/postgres/dsn" in sidecar["args"]
    assert not any(a.startswith("--postgres-dsn=") for a in sidecar["args"])
    assert mount(sidecar, "pool-monitor-postgres-dsn")["readOnly"] is True
    dsn_secret = volume(demo, "pool-monitor-postgres-dsn")["secret"]
    assert dsn_secret["items"][0]["path"] == "dsn"
    # The DSN Secret is mounted in the sidecar only, not in the app or the fake API.
    for c in pod_spec(demo)["containers"]:
        if c["name"] != "pool-monitor":
            assert "pool-monitor-postgres-dsn" not in [m["name"] for m in c.get("volumeMounts", [])]
    if variant == "external-dsn":
        assert ref == {"name": "orders-db", "key": "url"}
        assert (dsn_secret["secretName"], dsn_secret["items"][0]["key"]) == (
            "orders-db-monitor",
            "dsn",
        )
        assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == [
            "demo-pool-monitor-api-token"
        ]
    else:
        assert ref == {"name": "demo-pool-monitor-postgresql", "key": "dsn"}
        assert dsn_secret["secretName"] == "demo-pool-monitor-postgresql"
        secret = one(objects, "Secret", "postgresql")
        assert set(secret["data"]) == {"password", "dsn"}
        postgres = one(objects, "StatefulSet")
        pg_env = {e["name"]: e for e in container(postgres, "postgresql")["env"]}
        assert "value" not in pg_env["POSTGRES_PASSWORD"]
        assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"


def test_generated_postgres_dsn_points_at_the_bundled_server() -> None:
    import base64

    secret = one(render(), "Secret", "postgresql")
    dsn = base64.b64decode(secret["data"]["dsn"]).decode()
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert len(password) == 32 and password.isalnum()
    assert dsn == f"postgresql://demo:{password}@demo-pool-monitor-postgresql:5432/demo"


def test_api_token_secret_and_insecure_mode() -> None:
    demo = one(render(), "Deployment", "demo")
    sidecar = container(demo, "pool-monitor")
    assert "--auth-token-file=/etc/pool-monitor/api-token/token" in sidecar["args"]
    assert (
        volume(demo, "pool-monitor-api-token")["secret"]["secretName"]
        == "demo-pool-monitor-api-token"
    )

    objects = render({"sidecar": {"insecureApi": True}})
    sidecar = container(one(objects, "Deployment", "demo"), "pool-monitor")
    assert "--insecure-api" in sidecar["args"]
    assert not any(a.startswith("--auth-token-file") for a in sidecar["args"])
    assert "api-token" not in " ".join(o["metadata"]["name"] for o in objects)

    objects = render({"sidecar": {"apiToken": {"existingSecret": "my-token", "secretKey": "t"}}})
    demo = one(objects, "Deployment", "demo")
    assert volume(demo, "pool-monitor-api-token")["secret"]["items"] == [
        {"key": "t", "path": "token"}
    ]
    assert "api-token" not in " ".join(o["metadata"]["name"] for o in objects)


def test_sidecar_trace_url_template_becomes_its_environment_variable() -> None:
    assert "env" not in container(one(render(), "Deployment", "demo"), "pool-monitor")
    template = "https://tempo.example/trace/{trace_id}"
    demo = one(render({"sidecar": {"traceUrlTemplate": template}}), "Deployment", "demo")
    assert container(demo, "pool-monitor")["env"] == [
        {"name": "POOL_MONITOR_TRACE_URL_TEMPLATE", "value": template}
    ]
    assert "POOL_MONITOR_TRACE_URL_TEMPLATE" not in str(container(demo, "demo"))
    extra = {"name": "LOG_FORMAT", "value": "json"}
    values = {"sidecar": {"traceUrlTemplate": template, "extraEnv": [extra]}}
    sidecar = container(one(render(values), "Deployment", "demo"), "pool-monitor")
    assert sidecar["env"] == [
        {"name": "POOL_MONITOR_TRACE_URL_TEMPLATE", "value": template},
        extra,
    ]
    sidecar = container(
        one(render({"sidecar": {"extraEnv": [extra]}}), "Deployment"), "pool-monitor"
    )
    assert sidecar["env"] == [extra]


def test_sidecar_without_postgres() -> None:
    objects = render({"sidecar": {"postgres": {"enabled": False}}})
    demo = one(objects, "Deployment", "demo")
    sidecar = container(demo, "pool-monitor")
    assert not any(a.startswith("--postgres") for a in sidecar["args"])
    assert "pool-monitor-postgres-dsn" not in [v["name"] for v in pod_spec(demo)["volumes"]]


# --------------------------------------------------------------------------- PodMonitor


def test_podmonitor_selects_the_sidecar_pods_with_extra_labels() -> None:
    objects = render(EVERYTHING)
    pod_monitor = one(objects, "PodMonitor")
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = pod_monitor["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["app.kubernetes.io/instance"] == "demo"
    assert pod_monitor["metadata"]["annotations"] == {"team": "db"}
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    pod_labels = one(objects, "Deployment", "demo")["spec"]["template"]["metadata"]["labels"]
    assert selector == {"pool-monitor/sidecar": "demo-pool-monitor"}
    assert selector.items() <= pod_labels.items()
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == (
        "pool-monitor",
        "/metrics",
        "15s",
    )
    assert endpoint["relabelings"][0]["targetLabel"] == "service"
    assert endpoint["metricRelabelings"] == EVERYTHING["podMonitor"]["metricRelabelings"]
    assert "namespaceSelector" not in pod_monitor["spec"]
    # Exemplars travel only in OpenMetrics: the scrape keeps Prometheus' own protocol
    # negotiation, which asks for OpenMetrics first.
    assert "scrapeProtocols" not in pod_monitor["spec"]
    assert "scrapeProtocols" not in endpoint


def test_podmonitor_in_the_monitoring_namespace_looks_back() -> None:
    pod_monitor = one(
        render(
            {"podMonitor": {"enabled": True, "namespace": "monitoring", "selector": {"app": "x"}}}
        ),
        "PodMonitor",
    )
    assert pod_monitor["metadata"]["namespace"] == "monitoring"
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["pm"]}
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"app": "x"}


# --------------------------------------------------------------------------- PrometheusRule


def test_prometheusrule_equals_the_committed_rule_files() -> None:
    rule = one(render(rule_values()), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == committed_rule_groups()


OVERRIDES: list[dict[str, Any]] = [
    {
        "thresholds": {
            "pool_saturation_ratio": 0.95,
            "wait_time_p95_seconds": 0.25,
            "pg_idle_in_transaction_seconds": 45.5,
            "pending_requests": 3,
            "idle_in_use_share": 0.123456789,
            "pg_connections_usage_ratio": 1,
            "checkout_timeouts": 2.5,
            "idle_in_use_min_held_connections": 0,
        }
    },
    {
        "for_": {"PoolSaturated": "90s", "PostgresIdleInTransactionTooLong": "1h30m"},
        "severity": {"PoolSaturated": "critical", "PoolHoldTimeMostlyIdle": "warning"},
    },
    {
        "disabled": ["PoolMonitorErrors", "PoolCrossThreadConnectionUse"],
        "runbook_base_url": "https://runbooks.example.com/pool-monitor",
    },
    # Every alert of one group off: the group goes too.
    {
        "disabled": [
            "PostgresIdleInTransactionTooLong",
            "PostgresConnectionsNearLimit",
            "PostgresCollectorDown",
        ]
    },
]


@pytest.mark.parametrize(
    "overrides", OVERRIDES, ids=["thresholds", "for-severity", "disabled-runbook", "disabled-group"]
)
def test_prometheusrule_overrides_equal_render_rules(overrides: dict[str, Any]) -> None:
    keys = {
        "thresholds": "thresholds",
        "for_": "for",
        "severity": "severity",
        "disabled": "disabled",
        "runbook_base_url": "runbookBaseUrl",
    }
    values = rule_values(**{keys[k]: v for k, v in overrides.items()})
    rule = one(render(values), "PrometheusRule")
    assert rule["spec"]["groups"] == rendered_rule_groups(**overrides)


def test_collector_alert_left_out_without_a_dsn() -> None:
    values = {**rule_values(), "sidecar": {"postgres": {"enabled": False}}}
    rule = one(render(values), "PrometheusRule")
    assert rule["spec"]["groups"] == rendered_rule_groups(disabled=["PostgresCollectorDown"])


def test_additional_rule_labels_on_alerts_only() -> None:
    groups = one(render(EVERYTHING), "PrometheusRule")["spec"]["groups"]
    expected = rendered_rule_groups()
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    records = [r for g in groups for r in g["rules"] if "record" in r]
    assert alerts and records
    for rule in alerts:
        assert rule["labels"]["team"] == "payments"
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
    assert records == [r for g in expected for r in g["rules"] if "record" in r]
    stripped = [
        {**r, "labels": {k: v for k, v in r["labels"].items() if k != "team"}} for r in alerts
    ]
    assert stripped == [r for g in expected for r in g["rules"] if "alert" in r]


# --------------------------------------------------------------------------- dashboards


def test_dashboard_configmaps_hold_dashboards_json_exactly() -> None:
    maps = [o for o in render(EVERYTHING) if o["kind"] == "ConfigMap"]
    files = sorted(DASHBOARD_JSON.glob("*.json"))
    assert len(maps) == len(files) >= 4
    got = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Databases"}
        (key,) = cm["data"]
        got[key] = cm["data"][key]
    assert got == {f.name: f.read_text(encoding="utf-8") for f in files}


def test_dashboards_exclude_and_labels() -> None:
    values = {
        "dashboards": {
            "enabled": True,
            "exclude": ["demo-anti-pattern-vs-fix"],
            "labels": {"grafana_dashboard": "1", "team": "db"},
        }
    }
    maps = [o for o in render(values) if o["kind"] == "ConfigMap"]
    names = sorted(next(iter(cm["data"])) for cm in maps)
    assert "demo-anti-pattern-vs-fix.json" not in names
    assert len(names) == len(list(DASHBOARD_JSON.glob("*.json"))) - 1
    assert all(cm["metadata"]["labels"]["team"] == "db" for cm in maps)


# --------------------------------------------------------------------------- bad values


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    (
        "dsn in clear",
        {"database": {"dsn": "postgresql://u:p@h/db"}},
        "additional properties 'dsn' not allowed",
    ),
    (
        "password in clear",
        {"postgresql": {"auth": {"password": "hunter2"}}},
        "additional properties 'password' not allowed",
    ),
    (
        "ratio above 1",
        {"prometheusRule": {"thresholds": {"pool_saturation_ratio": 1.5}}},
        "/prometheusRule/thresholds/pool_saturation_ratio",
    ),
    (
        "unknown threshold",
        {"prometheusRule": {"thresholds": {"pool_saturation": 0.5}}},
        "additional properties 'pool_saturation' not allowed",
    ),
    (
        "threshold as text",
        {"prometheusRule": {"thresholds": {"pending_requests": "many"}}},
        "/prometheusRule/thresholds/pending_requests",
    ),
    (
        "bad duration",
        {"prometheusRule": {"for": {"PoolSaturated": "5 minutes"}}},
        "/prometheusRule/for/PoolSaturated",
    ),
    (
        "bad severity",
        {"prometheusRule": {"severity": {"PoolSaturated": "page"}}},
        "/prometheusRule/severity/PoolSaturated",
    ),
    (
        "unknown alert disabled",
        {"prometheusRule": {"disabled": ["PoolOnFire"]}},
        "/prometheusRule/disabled/0",
    ),
    ("unknown dashboard", {"dashboards": {"exclude": ["nope"]}}, "/dashboards/exclude/0"),
    ("disk medium", {"snapshots": {"medium": "Disk"}}, "/snapshots/medium"),
    ("no size limit", {"snapshots": {"sizeLimit": ""}}, "/snapshots/sizeLimit"),
    ("relative mount", {"snapshots": {"mountPath": "run/pm"}}, "/snapshots/mountPath"),
    ("port out of range", {"sidecar": {"port": 70000}}, "/sidecar/port"),
    (
        "trace URL without {trace_id}",
        {"sidecar": {"traceUrlTemplate": "https://tempo.example/trace/"}},
        "/sidecar/traceUrlTemplate",
    ),
    ("too many workers", {"demo": {"workers": 0}}, "/demo/workers"),
    ("pull policy", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("numeric label", {"podMonitor": {"labels": {"release": 1}}}, "/podMonitor/labels/release"),
    ("bad scrape interval", {"podMonitor": {"interval": "30 seconds"}}, "/podMonitor/interval"),
    (
        "typo at top level",
        {"podmonitor": {"enabled": True}},
        "additional properties 'podmonitor' not allowed",
    ),
    ("secret name", {"database": {"existingSecret": "Orders_DB"}}, "/database/existingSecret"),
]


@pytest.mark.parametrize(
    ("values", "message"), [(v, m) for _, v, m in BAD_VALUES], ids=[i for i, _, _ in BAD_VALUES]
)
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert message in str(caught.value)
    assert "pool-monitor" in str(caught.value)


def test_schema_accepts_every_default_and_a_parent_global() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({"global": {"imageRegistry": "mirror.example.com"}})
        chart.validate_schema(chart.values)


def test_demo_without_database_fails_with_the_fix() -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render({"postgresql": {"enabled": False}})
    assert "set postgresql.enabled=true" in str(caught.value)
    assert "database.existingSecret" in str(caught.value)


def test_insecure_api_with_a_token_secret_fails() -> None:
    with pytest.raises(helm.HelmRenderError, match="insecureApi"):
        render({"sidecar": {"insecureApi": True, "apiToken": {"existingSecret": "t"}}})


def test_readme_sidecar_values_equal_the_charts_helpers() -> None:
    """README path B (bitnami-style values) is what the chart's own helpers produce for a
    release named `pool-monitor` with the same settings."""
    readme = (HELM_DIR / "README.md").read_text()
    block = readme.split("<!-- sidecar-values:begin")[1].split("<!-- sidecar-values:end")[0]
    snippet = yaml.safe_load(block.split("```yaml\n")[1].split("```")[0])
    values = {
        "postgresql": {"enabled": False},
        "database": {"existingSecret": "orders-db"},
        "sidecar": {"postgres": {"existingSecret": "orders-db-monitor"}},
    }
    demo = one(render(values, name="pool-monitor"), "Deployment", "demo")
    spec, app = pod_spec(demo), container(demo, "demo")
    ours = {"pool-monitor-snapshots", "pool-monitor-postgres-dsn", "pool-monitor-api-token"}
    assert snippet == {
        "podLabels": {"pool-monitor/sidecar": "pool-monitor"},
        "command": app["command"],
        "extraEnvVars": [e for e in app["env"] if e["name"] == "POOL_MONITOR_SNAPSHOT_DIR"],
        "extraVolumeMounts": [m for m in app["volumeMounts"] if m["name"] in ours],
        "extraVolumes": [v for v in spec["volumes"] if v["name"] in ours],
        "sidecars": [container(demo, "pool-monitor")],
    }
    assert demo["spec"]["template"]["metadata"]["labels"]["pool-monitor/sidecar"] == "pool-monitor"


# --------------------------------------------------------------------------- example chart


@pytest.fixture(scope="module")
def example_chart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example, with its `file://../../pool-monitor` dependency fetched as a user would."""
    root = tmp_path_factory.mktemp("helm")
    shutil.copytree(CHART, root / "pool-monitor")
    shutil.copytree(
        EXAMPLE,
        root / "examples" / "my-service",
        ignore=shutil.ignore_patterns("charts", "Chart.lock"),
    )
    chart = root / "examples" / "my-service"
    helm.dependency_update(chart)
    assert [p.name for p in (chart / "charts").iterdir()] == ["pool-monitor-0.1.0.tgz"]
    yield chart


def test_example_chart_lints_renders_and_validates(example_chart: Path) -> None:
    assert lint_problems(example_chart, with_subcharts=True) == []
    objects = render(chart=example_chart, name="orders")
    validate_kubernetes(objects)
    assert kinds(objects) == ["ConfigMap"] * 3 + [
        "Deployment",
        "PodMonitor",
        "PrometheusRule",
        "Secret",
        "Service",
    ]


def test_example_chart_gets_sidecar_volume_and_podmonitor(example_chart: Path) -> None:
    objects = render(chart=example_chart, name="orders")
    app_deployment = one(objects, "Deployment", "my-service")
    app, sidecar = container(app_deployment, "app"), container(app_deployment, "pool-monitor")
    assert app["command"][:2] == ["/bin/sh", "-c"]
    assert app["args"][0] == "uvicorn"
    assert {e["name"] for e in app["env"]} == {"DATABASE_URL", "POOL_MONITOR_SNAPSHOT_DIR"}
    assert not mount(app, "pool-monitor-snapshots").get("readOnly", False)
    assert mount(sidecar, "pool-monitor-snapshots")["readOnly"] is True
    assert volume(app_deployment, "pool-monitor-snapshots")["emptyDir"]["medium"] == "Memory"
    assert volume(app_deployment, "pool-monitor-postgres-dsn")["secret"]["secretName"] == (
        "orders-db-monitor"
    )
    token = volume(app_deployment, "pool-monitor-api-token")["secret"]["secretName"]
    assert one(objects, "Secret")["metadata"]["name"] == token == "orders-pool-monitor-api-token"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"

    pod_monitor = one(objects, "PodMonitor")
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod_labels = app_deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["app.kubernetes.io/name"] == "my-service"  # -> the `service` label

    rule = one(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == rendered_rule_groups(
        thresholds={"pool_saturation_ratio": 0.85}, for_={"PoolSaturated": "10m"}
    )
    names = sorted(next(iter(o["data"])) for o in objects if o["kind"] == "ConfigMap")
    assert names == sorted(
        p.name for p in DASHBOARD_JSON.glob("*.json") if p.stem != "demo-anti-pattern-vs-fix"
    )
