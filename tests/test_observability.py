"""What operators watch, offline: the Grafana dashboard, the alert rules and the monitoring component.

Every PromQL expression parses (promql-parser, Prometheus' grammar in Rust), names only metrics the
services define (read from prometheus_client's registry after importing their metric modules), and
every alert carries what an on-call person needs. The component renders into each overlay, adding
its objects and changing nothing else, and its PodMonitor scrapes every Baton pod's metrics port.
There is no cluster here and kubernetes-validate has no schemas for the Prometheus operator's
kinds, so their essential structure is checked by hand.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

from tests.test_deploy import OVERLAYS, containers, render, tool

REPO = Path(__file__).resolve().parents[1]
OBSERVABILITY = REPO / "deploy" / "observability"
COMPONENT = REPO / "deploy" / "k8s" / "components" / "monitoring"
DASHBOARD = OBSERVABILITY / "baton-dashboard.json"
ALERTS = OBSERVABILITY / "alerts.yaml"
PODMONITOR = OBSERVABILITY / "podmonitor.yaml"

# The modules that define Baton's metrics (issue 16's catalog).
METRIC_MODULES = (
    "services.common.grpc_metrics",
    "services.common.http_endpoints",
    "services.common.blobs",
    "services.common.workers",
    "services.gateway.metrics",
    "services.denoiser.metrics",
)
# Grafana's own variables, as a query would see them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "6h"}
SEVERITIES = {"critical", "warning"}
MONITORING_KINDS = {"PodMonitor", "PrometheusRule", "ConfigMap"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    """Every panel but the rows, also those inside collapsed rows."""
    out = []
    for panel in dashboard()["panels"]:
        out.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return out


def rules() -> list[dict]:
    return [r for doc in yaml.safe_load_all(ALERTS.read_text()) for g in doc["spec"]["groups"] for r in g["rules"]]


def expressions() -> dict[str, str]:
    """Where -> PromQL, for every alert and every dashboard query (Grafana's variables filled in)."""
    found = {f"alert {r['alert']}": r["expr"] for r in rules()}
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found[f"panel {panel['title']!r} {target['refId']}"] = expr
    return found


def parse(expr: str):
    return promql_parser.parse(expr)


def children(node) -> list:
    if isinstance(node, promql_parser.Call):
        return list(node.args)
    if isinstance(node, promql_parser.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, promql_parser.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, promql_parser.AggregateExpr):
        return [node.expr] + ([node.param] if node.param is not None else [])
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return [node.expr]
    return []


def metric_names(node) -> set[str]:
    """The metric names an expression selects."""
    if isinstance(node, promql_parser.VectorSelector):
        named = {m.value for m in node.matchers.matchers if m.name == "__name__"}
        return ({node.name} if node.name else set()) | named
    return set().union(*(metric_names(c) for c in children(node)))


def output_labels(node) -> set[str] | None:
    """The labels an expression's series can carry; None where any label may survive."""
    if isinstance(node, promql_parser.AggregateExpr):
        if node.modifier is None:
            return set()
        return set(node.modifier.labels) if node.modifier.type == promql_parser.AggModifierType.By else None
    if isinstance(node, promql_parser.Call):
        if node.func.name == "absent":
            selector = node.args[0]
            return {m.name for m in selector.matchers.matchers if m.op == promql_parser.MatchOp.Equal}
        if node.func.name == "vector":
            return set()
        vectors = [output_labels(a) for a in node.args if not isinstance(a, promql_parser.NumberLiteral)]
        labels = vectors[-1] if vectors else set()
        return None if labels is None else labels - {"le"} if node.func.name == "histogram_quantile" else labels
    if isinstance(node, promql_parser.BinaryExpr):
        sides = [output_labels(s) for s in (node.lhs, node.rhs) if not isinstance(s, promql_parser.NumberLiteral)]
        if str(node.op) == "or":
            return None if None in sides else set().union(*sides)
        return sides[0]
    if isinstance(node, promql_parser.NumberLiteral):
        return set()
    kids = children(node)
    return output_labels(kids[0]) if kids else None


def defined_metrics() -> tuple[set[str], list[str]]:
    """The series names Baton's metric modules register (a counter's _total, a histogram's _bucket,
    _sum and _count), and the modules that do not exist yet."""
    missing = []
    for module in METRIC_MODULES:
        if importlib.util.find_spec(module) is None:
            missing.append(module)
        else:
            importlib.import_module(module)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    families = list(REGISTRY.collect())
    names = {f.name + s for f in families for s in suffixes.get(f.type, ("",))}
    # A collector that yields nothing here (GPU memory, without a GPU) still registered the names it
    # describes; prometheus_client keeps those only in the registry's private map, together with
    # the bare names of counters and histograms, which no query may use.
    bare = {f.name for f in families if f.type not in ("gauge", "unknown")}
    described = set(getattr(REGISTRY, "_names_to_collectors", {})) - bare
    return names | {n for n in described if not n.endswith("_created")}, missing


def metric_labels() -> dict[str, set[str] | None]:
    """Series name -> the labels Baton gives it (None: a custom collector, labels unknown)."""
    out: dict[str, set[str] | None] = {}
    for collector, names in getattr(REGISTRY, "_collector_to_names", {}).items():
        labels = getattr(collector, "_labelnames", None)
        for name in names:
            out[name] = None if labels is None else set(labels) | ({"le"} if name.endswith("_bucket") else set())
    return out


def target_labels() -> set[str]:
    """What the Prometheus operator adds to every series a PodMonitor scrapes, and our relabelings."""
    monitor = yaml.safe_load(PODMONITOR.read_text())
    relabeled = {r["targetLabel"] for e in monitor["spec"]["podMetricsEndpoints"] for r in e.get("relabelings", [])}
    return {"namespace", "pod", "container", "endpoint", "job", "instance"} | relabeled


def label_misuse(node, labels: dict[str, set[str] | None], targets: set[str]) -> list[str]:
    """Matchers and `by` labels that no selected metric carries."""
    errors = []
    if isinstance(node, promql_parser.VectorSelector):
        known = labels.get(node.name)
        for m in node.matchers.matchers:
            if known is not None and m.name not in known | targets:
                errors.append(f"{node.name} has no label {m.name}")
    if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
        inside = [labels.get(n) for n in metric_names(node.expr)]
        if inside and None not in inside:
            carried = set().union(*inside) | targets
            errors += [
                f"{node.op} by {label}: not a label of {sorted(metric_names(node.expr))}"
                for label in node.modifier.labels
                if label not in carried
            ]
    return errors + [e for c in children(node) for e in label_misuse(c, labels, targets)]


def test_the_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]] + [p["id"] for p in panels() if p not in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = [p["title"] for p in panels()]
    assert len(titles) == len(set(titles)), "panel titles repeat"


def test_every_dashboard_panel_has_the_datasource_and_queries():
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_the_dashboard_has_a_row_for_each_part_of_baton():
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert rows == ["Jobs", "Stages", "Denoisers", "gRPC", "Blobs", "Health"]


def test_the_dashboard_fits_in_a_configmap_applied_client_side():
    # kubectl apply keeps the whole object in an annotation limited to 256 KiB.
    assert DASHBOARD.stat().st_size < 200_000


def test_every_promql_expression_parses():
    errors = []
    for where, expr in expressions().items():
        try:
            parse(expr)
        except ValueError as exc:
            errors.append(f"{where}: {exc}\n  {expr}")
    assert not errors, "\n".join(errors)


def test_the_parser_refuses_broken_promql():
    """The check above is a real grammar, not a bracket count."""
    for broken in ("sum(rate(x[5m])", "rate(x)", "histogram_quantile(0.9 x)", "x{a=b}", "sum by le (x)"):
        with pytest.raises(ValueError):
            parse(broken)


def test_every_metric_in_the_rules_and_the_dashboard_is_one_the_services_define():
    referenced: dict[str, set[str]] = {}
    for where, expr in expressions().items():
        for name in metric_names(parse(expr)):
            referenced.setdefault(name, set()).add(where)
    variable = {v["name"]: v for v in dashboard()["templating"]["list"]}["namespace"]
    referenced.setdefault(re.match(r"label_values\((\w+)", variable["definition"])[1], set()).add("variable")
    defined, missing = defined_metrics()
    undefined = {name: sorted(where) for name, where in referenced.items() if name not in defined}
    if undefined and missing:
        pytest.skip(f"not yet written: {', '.join(missing)}; undefined so far: {', '.join(sorted(undefined))}")
    assert not undefined, json.dumps(undefined, indent=1)


def test_every_label_in_the_rules_and_the_dashboard_is_one_the_metrics_or_the_scrape_give():
    _, missing = defined_metrics()
    labels, targets = metric_labels(), target_labels()
    errors = [
        f"{where}: {e}" for where, expr in expressions().items() for e in label_misuse(parse(expr), labels, targets)
    ]
    if errors and missing:
        pytest.skip(f"not yet written: {', '.join(missing)}")
    assert not errors, "\n".join(errors)


def test_every_alert_says_how_long_how_bad_what_it_means_and_what_to_do():
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["alert"].startswith("Baton"), rule
        assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0, rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        notes = rule["annotations"]
        assert len(notes["summary"]) < 150 and "\n" not in notes["summary"].strip(), rule["alert"]
        assert len(notes["description"]) > 150, f"{rule['alert']}: say what it means and what to do"
        for text in notes.values():
            assert text.count("{{") == text.count("}}"), rule["alert"]


def test_annotations_name_only_labels_the_alerts_series_carry():
    for rule in rules():
        carried = output_labels(parse(rule["expr"]))
        used = {m for text in rule["annotations"].values() for m in re.findall(r"\$labels\.(\w+)", text)}
        if carried is not None:
            assert used <= carried, f"{rule['alert']}: {sorted(used - carried)} are aggregated away"


def test_the_alerts_cover_queue_wait_failures_workers_and_redis():
    by_metric = {}
    for rule in rules():
        for name in metric_names(parse(rule["expr"])):
            by_metric.setdefault(name, []).append(rule)
    assert by_metric["baton_job_queue_wait_seconds_bucket"]
    assert any("failed" in r["expr"] for r in by_metric["baton_jobs_finished_total"])
    workers = {m: r for r in by_metric["baton_workers"] for m in re.findall(r'kind="(\w+)"', r["expr"])}
    assert set(workers) == {"denoiser", "interposer", "processor"}
    assert all("absent(" in r["expr"] for r in workers.values())
    redis = by_metric["baton_redis_up"]
    assert any("== 0" in r["expr"] and r["for"] == "1m" for r in redis) and any("absent(" in r["expr"] for r in redis)


# The monitoring component, rendered into each overlay.


def render_with_monitoring(overlay: str, tmp_path: Path, patches: str = "") -> list[dict]:
    # kustomize takes only relative paths to other kustomizations.
    overlay_dir = os.path.relpath(REPO / "deploy" / "k8s" / "overlays" / overlay, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{overlay_dir}]\ncomponents: [{os.path.relpath(COMPONENT, tmp_path)}]\n{patches}"
    )
    result = subprocess.run([tool("kubectl"), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def monitoring(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/") or doc["metadata"]["name"] == "baton-dashboard":
            out.setdefault(doc["kind"], []).append(doc)
    return out


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    tests = {
        "In": lambda e: labels.get(e["key"]) in e["values"],
        "NotIn": lambda e: labels.get(e["key"]) not in e["values"],
        "Exists": lambda e: e["key"] in labels,
        "DoesNotExist": lambda e: e["key"] not in labels,
    }
    return all(tests[e["operator"]](e) for e in selector.get("matchExpressions", []))


@pytest.fixture(scope="module", params=OVERLAYS)
def monitored(request, tmp_path_factory) -> tuple[str, list[dict]]:
    return request.param, render_with_monitoring(request.param, tmp_path_factory.mktemp(request.param))


def test_the_component_adds_the_podmonitor_the_rules_and_the_dashboard_and_changes_nothing_else(monitored):
    overlay, docs = monitored
    added = monitoring(docs)
    assert set(added) == MONITORING_KINDS
    assert [d["apiVersion"] for d in added["PodMonitor"] + added["PrometheusRule"]] == ["monitoring.coreos.com/v1"] * 5
    ours = [id(d) for kind in added.values() for d in kind]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted((d for d in docs if id(d) not in ours), key=key) == sorted(render(overlay), key=key)


def test_the_rendered_rules_are_prometheus_rules(monitored):
    _, docs = monitored
    groups = [g for doc in monitoring(docs)["PrometheusRule"] for g in doc["spec"]["groups"]]
    assert len({g["name"] for g in groups}) == len(groups)
    for group in groups:
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
            assert {"summary", "description"} <= set(rule["annotations"]) and "severity" in rule["labels"]


def test_the_podmonitor_scrapes_the_metrics_port_of_every_baton_pod_and_nothing_else(monitored):
    _, docs = monitored
    (monitor,) = monitoring(docs)["PodMonitor"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    baton = {id(c) for _, c in containers(docs)}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert {d["metadata"]["name"] for d in workloads} >= {"baton-gateway", "baton-denoiser"}
    for workload in workloads:
        template = workload["spec"]["template"]
        ours = any(id(c) in baton for c in template["spec"]["containers"])
        assert selects(monitor["spec"]["selector"], template["metadata"]["labels"]) == ours, workload["metadata"]
        if ours:
            ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            assert endpoint["port"] in ports, workload["metadata"]["name"]


def admits_scrapes(rule: dict, port: int) -> bool:
    """Whether a NetworkPolicy ingress rule lets Prometheus in the monitoring namespace reach `port`."""
    ports = {p["port"] for p in rule.get("ports", [])}
    if ports and port not in ports:
        return False
    sources = rule.get("from", [])
    monitoring_ns = {"kubernetes.io/metadata.name": "monitoring"}
    return not sources or any(
        s.get("namespaceSelector", {}).get("matchLabels") == monitoring_ns and "podSelector" not in s for s in sources
    )


def test_the_network_policies_let_the_monitoring_namespace_reach_every_metrics_port(monitored):
    _, docs = monitored
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy" and "Ingress" in d["spec"]["policyTypes"]]
    for _, c in containers(docs):
        pod = next(d for d in docs if d["kind"] == "Deployment" and c in d["spec"]["template"]["spec"]["containers"])
        labels = pod["spec"]["template"]["metadata"]["labels"]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
        isolating = [p for p in policies if selects(p["podSelector"], labels)]
        assert not isolating or any(admits_scrapes(r, port) for p in isolating for r in p.get("ingress", [])), (
            f"{pod['metadata']['name']}: no ingress to {port} from the monitoring namespace"
        )


def test_the_dashboard_configmap_is_the_dashboard_with_the_grafana_sidecar_label(monitored):
    _, docs = monitored
    (configmap,) = monitoring(docs)["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["baton-dashboard.json"]) == dashboard()


def test_a_cluster_without_interposers_drops_their_alert_with_a_delete_patch(tmp_path):
    """The patch the component's kustomization.yaml and README.md show."""
    patch = (
        "\n".join(("$patch: delete", "apiVersion: monitoring.coreos.com/v1", "kind: PrometheusRule", "metadata:"))
        + "\n  name: baton-no-interposer"
    )
    docs = render_with_monitoring("cpu-dev", tmp_path, f"patches:\n  - patch: {json.dumps(patch)}\n")
    alerts = {
        r["alert"] for doc in monitoring(docs)["PrometheusRule"] for g in doc["spec"]["groups"] for r in g["rules"]
    }
    assert "BatonNoInterposer" not in alerts and {"BatonNoDenoiser", "BatonNoProcessor"} <= alerts
    assert patch.splitlines()[0] in (COMPONENT / "kustomization.yaml").read_text()


def test_the_readme_lists_every_alert_and_names_only_real_metrics():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Operating Baton", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `Baton")]
    listed = {name for cell in first_cells for name in re.findall(r"`(Baton\w+)`", cell)}
    assert listed == {r["alert"] for r in rules()}
    defined, _ = defined_metrics()
    named = set(re.findall(r"\b(?:baton|grpc_server)_[a-z_]*[a-z]\b", section))
    assert {n for n in named if not {n, n + "_bucket"} & defined} == set()
