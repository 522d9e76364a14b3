"""The Grafana dashboard of the Helm chart uses only metrics that Tandem's processes export.

The set of exported metrics is built from the code wherever it can be:

- the ingress's Prometheus registry: `serving.http.metrics.IngressMetrics` with the admission collector that
  `serving.http.gateway.Gateway` registers on it (families, types and label names as prometheus_client
  exposes them: a counter `x` is scraped as `x_total`, a histogram as `x_bucket`, `x_sum`, `x_count`);
- Ray metrics (`ray.util.metrics` / `ray.serve.metrics`) defined anywhere in `router/` and `serving/`,
  found by parsing the modules. Ray's metrics agent exports them with a `ray_` prefix, and a counter with
  `_total` appended unless its name already ends so (Ray 2.60's OpenTelemetry exporter; checked by
  hand with `OpenTelemetryMetricRecorder`: `tandem_router_prefix_blocks_total` is scraped as
  `ray_tandem_router_prefix_blocks_total`). Metrics made with `ray.serve.metrics` also carry the
  `deployment`, `replica` and `application` labels;
- a short allow-list of Ray Serve's own metrics (`SERVE_METRICS`), each checked against the installed
  Ray's source so that a Ray upgrade that renames one fails here.

vLLM's own `vllm:*` metrics are not in the set: Tandem runs vLLM's AsyncLLM inside a Ray actor, where
vLLM's Prometheus logger writes to that process's default registry, which nothing serves (ray.serve.llm
exports them only through `RayPrometheusStatLogger`, which Tandem does not install).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "helm" / "tandem" / "files" / "dashboards" / "tandem.json"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

#: Labels Prometheus attaches to every scraped series (target labels), usable in any query.
SCRAPE_LABELS = frozenset({"instance", "job", "namespace", "pod", "container", "service", "endpoint"})

#: Ray Serve's built-in metrics the dashboard may use: Ray name → (type, labels, file of the installed
#: `ray` package that defines it). Exported as `ray_<name>` (docs.ray.io "Ray Serve metrics"; Ray's own
#: Serve Grafana dashboards in ray/dashboard/modules/metrics/dashboards query the same names).
SERVE_METRICS: dict[str, tuple[str, frozenset[str], str]] = {
    # 1/0 per replica (the deployment's healthy count when high-cardinality tags are off).
    "serve_deployment_replica_healthy": (
        "gauge",
        frozenset({"deployment", "replica", "application"}),
        "serve/_private/deployment_state.py",
    ),
    # The replica count the controller is moving the deployment to.
    "serve_autoscaling_target_replicas": (
        "gauge",
        frozenset({"deployment", "application"}),
        "serve/_private/deployment_state.py",
    ),
    # Ongoing calls per replica (ray.serve.metrics adds deployment/replica/application).
    "serve_replica_processing_queries": (
        "gauge",
        frozenset({"deployment", "replica", "application"}),
        "serve/_private/replica.py",
    ),
    # Requests waiting in a handle for a replica.
    "serve_deployment_queued_queries": (
        "gauge",
        frozenset({"deployment", "application", "handle", "actor_id"}),
        "serve/_private/router.py",
    ),
}

_RAY_METRIC_MODULES = ("ray.util.metrics", "ray.serve.metrics")
_RAY_METRIC_PARENTS = {"ray.util": "ray.util.metrics", "ray.serve": "ray.serve.metrics"}
_RAY_KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}
_SERVE_TAGS = frozenset({"deployment", "replica", "application"})


# -- what Tandem exports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One exported metric family: its Prometheus name as scraped, its type, labels and origin."""

    name: str
    kind: str
    labels: frozenset[str]
    origin: str

    def samples(self) -> dict[str, frozenset[str]]:
        """Series names Prometheus stores for this family, with the labels each may carry."""
        labels = self.labels | SCRAPE_LABELS
        if self.kind == "counter":
            base = self.name.removesuffix("_total")
            return {base + "_total": labels}
        if self.kind == "histogram":
            return {
                self.name + "_bucket": labels | {"le"},
                self.name + "_sum": labels,
                self.name + "_count": labels,
            }
        return {self.name: labels}

    @property
    def display_name(self) -> str:
        """The name a reader looks for: `x_total` for counters, the base name otherwise."""
        return self.name.removesuffix("_total") + "_total" if self.kind == "counter" else self.name


def ingress_families() -> list[Family]:
    """The ingress registry's families, as a real ingress builds it (metrics + the gateway's collector)."""
    from prometheus_client.metrics import MetricWrapperBase

    from serving.config import load_spec
    from serving.http.gateway import Gateway
    from serving.http.metrics import IngressMetrics

    metrics = IngressMetrics()
    Gateway.from_spec(load_spec(ROOT / "configs" / "local.yaml"), metrics)
    wrappers = {m._name: m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    out = []
    for fam in metrics.registry.collect():
        wrapper = wrappers.get(fam.name)
        labels = wrapper._labelnames if wrapper is not None else getattr(fam, "_labelnames", None)
        assert labels is not None, f"no label names found for {fam.name}"
        out.append(Family(fam.name, fam.type, frozenset(labels), "serving/http/metrics.py"))
    return out


@dataclass
class _RayScan:
    families: list[Family] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)


def _ray_metric_aliases(tree: ast.AST) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Names bound to Ray metric classes (alias → (kind, module)) and to Ray's metrics modules."""
    classes: dict[str, tuple[str, str]] = {}
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in _RAY_METRIC_MODULES:
            for a in node.names:
                if a.name in _RAY_KINDS:
                    classes[a.asname or a.name] = (_RAY_KINDS[a.name], node.module)
        elif isinstance(node, ast.ImportFrom) and node.module in _RAY_METRIC_PARENTS:
            for a in node.names:
                if a.name == "metrics":
                    modules[a.asname or a.name] = _RAY_METRIC_PARENTS[node.module]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in _RAY_METRIC_MODULES:
                    modules[a.asname or a.name] = a.name
    return classes, modules


def _const_strings(node: ast.AST | None) -> list[str] | None:
    if isinstance(node, ast.Tuple | ast.List) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]
    return None


def scan_ray_metrics(files: list[Path]) -> _RayScan:
    """Ray metrics constructed in `files`, with their tag keys (parsed, not imported)."""
    scan = _RayScan()
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        classes, modules = _ray_metric_aliases(tree)
        if not classes and not modules:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            kind_module = None
            f = node.func
            if isinstance(f, ast.Name) and f.id in classes:
                kind_module = classes[f.id]
            elif isinstance(f, ast.Attribute) and f.attr in _RAY_KINDS:
                owner = ast.unparse(f.value)
                if owner in modules:
                    kind_module = (_RAY_KINDS[f.attr], modules[owner])
                elif owner in _RAY_METRIC_MODULES:
                    kind_module = (_RAY_KINDS[f.attr], owner)
            if kind_module is None:
                continue
            kind, module = kind_module
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}"
            name_node = node.args[0] if node.args else None
            tags_node = node.args[2] if len(node.args) > 2 else None
            for kw in node.keywords:
                if kw.arg == "name":
                    name_node = kw.value
                elif kw.arg == "tag_keys":
                    tags_node = kw.value
            if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
                scan.unresolved.append(f"{where}: metric name is not a string literal")
                continue
            tags = [] if tags_node is None else _const_strings(tags_node)
            if tags is None:
                scan.unresolved.append(f"{where}: tag_keys is not a literal tuple of strings")
                continue
            labels = frozenset(tags) | (_SERVE_TAGS if module == "ray.serve.metrics" else frozenset())
            scan.families.append(Family("ray_" + name_node.value, kind, labels, where))
    return scan


def _tandem_sources() -> list[Path]:
    return sorted(p for d in ("router", "serving") for p in (ROOT / d).rglob("*.py"))


def serve_families() -> list[Family]:
    return [
        Family("ray_" + name, kind, labels, f"ray/{where}")
        for name, (kind, labels, where) in SERVE_METRICS.items()
    ]


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name Tandem's processes export → the labels it may carry."""
    out: dict[str, frozenset[str]] = {}
    for fam in ingress_families() + scan_ray_metrics(_tandem_sources()).families + serve_families():
        out.update(fam.samples())
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    return exported_series()


# -- PromQL ---------------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\[\]]*\]")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.$])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


@dataclass
class Parsed:
    """The metric names of one PromQL expression and the labels it refers to."""

    metrics: list[str]
    matchers: list[tuple[str, str]]  # (metric, label) from `metric{label=...}`
    grouping: list[str]  # labels of by / without / on / ignoring / group_left / group_right
    errors: list[str]


def parse_promql(expr: str) -> Parsed:
    """Metric names (identifiers that are not functions, keywords, labels or values) of `expr`."""
    errors = []
    text = _STRING.sub('""', expr)
    text = _RANGE.sub("", text)
    matchers = []

    def selector(m: re.Match) -> str:
        name = m.group(1)
        if name is None or name in _KEYWORDS:
            errors.append(f"selector without a metric name: {{{m.group(2)}}}")
            return " "
        matchers.extend((name, label) for label in _MATCHER.findall(m.group(2)))
        return name

    text = _SELECTOR.sub(selector, text)
    grouping = []
    for m in _GROUPING.finditer(text):
        grouping.extend(label.strip() for label in m.group(1).split(",") if label.strip())
    text = _GROUPING.sub(" ", text)
    metrics = [name for name in _IDENT.findall(text) if name.lower() not in _KEYWORDS | {"inf", "nan"}]
    return Parsed(metrics, matchers, grouping, errors)


def problems(expr: str, exported: dict[str, frozenset[str]]) -> list[str]:
    """What is wrong with `expr`: metrics Tandem does not export, labels those metrics lack."""
    p = parse_promql(expr)
    out = list(p.errors)
    if not p.metrics:
        out.append("no metric in the expression")
    for name in p.metrics:
        if name not in exported:
            out.append(f"{name} is not exported")
    for name, label in p.matchers:
        if name in exported and label not in exported[name]:
            out.append(f"{name} has no label {label!r}")
    for label in p.grouping:
        for name in p.metrics:
            if name in exported and label not in exported[name]:
                out.append(f"{name} has no label {label!r} (used in by/on/ignoring)")
    return out


def variable_problems(query: str, exported: dict[str, frozenset[str]]) -> list[str]:
    """Problems of a `label_values(metric, label)` variable query."""
    m = _LABEL_VALUES.match(query)
    if m is None:
        return [f"not a label_values(metric, label) query: {query!r}"]
    out = problems(m.group(1), exported)
    for name in parse_promql(m.group(1)).metrics:
        if name in exported and m.group(2) not in exported[name]:
            out.append(f"{name} has no label {m.group(2)!r}")
    return out


# -- the dashboard --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _graph_panels(dashboard: dict) -> list[dict]:
    return [p for p in _panels(dashboard) if p["type"] != "row"]


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable(dashboard):
    assert dashboard["title"]
    assert dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"model", "deployment"} <= set(variables)


def test_every_panel_has_a_title_and_a_target_on_the_datasource_variable(dashboard):
    panels = _graph_panels(dashboard)
    assert len(panels) >= 10
    for p in panels:
        assert p.get("title"), f"panel {p.get('id')} has no title"
        assert p.get("targets"), f"panel {p['title']!r} has no target"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r}: target {t.get('refId')} has no expr"
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_panel_ids_are_unique_and_panels_fit_the_grid(dashboard):
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for p in _panels(dashboard):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]


def test_the_exported_set_is_built_from_the_code(exported):
    # The ingress registry (prometheus_client), the admission collector, the router's Ray metrics.
    for name in (
        "tandem_requests_total",
        "tandem_time_to_first_token_seconds_bucket",
        "tandem_admission_queue_depth",
        "ray_tandem_router_decision_seconds_bucket",
        "ray_tandem_router_prefix_blocks_total",
        "ray_serve_deployment_replica_healthy",
    ):
        assert name in exported
    assert "ray_tandem_router_prefix_blocks_total_total" not in exported
    assert exported["ray_tandem_router_prefix_blocks_total"] >= {"deployment", "result"}
    assert exported["tandem_admission_rejections_total"] >= {"reason", "model"}


def test_ray_metrics_in_the_code_are_all_understood():
    scan = scan_ray_metrics(_tandem_sources())
    assert not scan.unresolved
    assert {f.name for f in scan.families} >= {
        "ray_tandem_router_decision_seconds",
        "ray_tandem_router_prefix_blocks_total",
    }


def test_ray_metric_scan_reads_every_import_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from ray.util.metrics import Counter as C\n"
        "from ray.serve import metrics\n"
        "import ray.util.metrics\n"
        "def f(name):\n"
        "    C('a_total', tag_keys=('x',))\n"
        "    metrics.Gauge('b', description='', tag_keys=['y'])\n"
        "    ray.util.metrics.Histogram(name='c', boundaries=[1.0])\n"
        "    C(name)\n"
    )
    scan = scan_ray_metrics([src])
    assert {(f.name, f.kind, f.labels) for f in scan.families} == {
        ("ray_a_total", "counter", frozenset({"x"})),
        ("ray_b", "gauge", frozenset({"y", "deployment", "replica", "application"})),
        ("ray_c", "histogram", frozenset()),
    }
    assert len(scan.unresolved) == 1 and "not a string literal" in scan.unresolved[0]


def test_ray_serve_allow_list_matches_the_installed_ray():
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    ray_dir = Path(list(spec.submodule_search_locations)[0])
    for name, (_, _, where) in SERVE_METRICS.items():
        source = (ray_dir / where).read_text()
        assert f'"{name}"' in source, f"Ray no longer defines {name} in ray/{where}"


def test_every_metric_in_the_dashboard_is_exported(dashboard, exported):
    bad = []
    for p in _graph_panels(dashboard):
        for t in p["targets"]:
            bad.extend(f"{p['title']!r} {t['refId']}: {msg}" for msg in problems(t["expr"], exported))
    assert not bad, "\n".join(bad)


def test_every_variable_query_uses_an_exported_metric_and_label(dashboard, exported):
    bad = []
    for v in dashboard["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        assert query == v.get("definition", query)
        bad.extend(f"variable {v['name']}: {msg}" for msg in variable_problems(query, exported))
    assert not bad, "\n".join(bad)


# -- the checker itself can fail ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("rate(tandem_made_up_metric_total[5m])", "tandem_made_up_metric_total is not exported"),
        # A counter is scraped with `_total`; the bare family name is not a series.
        ("rate(tandem_requests[5m])", "tandem_requests is not exported"),
        # A gauge has no `_total`, a histogram no bare series.
        ("tandem_requests_in_flight_total", "tandem_requests_in_flight_total is not exported"),
        ("tandem_time_to_first_token_seconds", "tandem_time_to_first_token_seconds is not exported"),
        # vLLM's own metrics are not served by Tandem's processes.
        ('vllm:kv_cache_usage_perc{model_name="x"}', "vllm:kv_cache_usage_perc is not exported"),
        ('sum(rate(tandem_requests_total{pool="decode"}[5m]))', "tandem_requests_total has no label 'pool'"),
        ("sum by (pool) (rate(tandem_retries_total[5m]))", "tandem_retries_total has no label 'pool'"),
        ('sum(rate({__name__=~"tandem_.*"}[5m]))', "selector without a metric name"),
    ],
)
def test_the_checker_rejects(expr, expected, exported):
    found = problems(expr, exported)
    assert any(expected in msg for msg in found), found


@pytest.mark.parametrize(
    "expr",
    [
        "histogram_quantile(0.99, sum by (model, le) "
        '(rate(tandem_time_to_first_token_seconds_bucket{model=~"$model"}[$__rate_interval])))',
        'sum(rate(tandem_requests_total{status=~"5..", model="rate"}[5m])) by (model) '
        "/ ignoring(status) sum by (model) (rate(tandem_requests_total[5m])) > bool 0.5",
        "sum by (deployment) (ray_serve_deployment_replica_healthy) offset 1h",
        "sum(rate(ray_tandem_router_prefix_blocks_total[5m:1m])) * 1e-3",
    ],
)
def test_the_checker_accepts(expr, exported):
    assert problems(expr, exported) == []


def test_parse_promql_finds_metrics_not_functions_labels_or_values():
    p = parse_promql(
        'histogram_quantile(0.5, sum by (model, le) (rate(a_bucket{model=~"sum|rate"}[5m]))) '
        "/ on(model) group_left max(b) + count(c offset 5m) and d"
    )
    assert p.metrics == ["a_bucket", "b", "c", "d"]
    assert p.matchers == [("a_bucket", "model")]
    assert p.grouping == ["model", "le", "model"]
    assert p.errors == []


def test_variable_checker_rejects_a_made_up_metric_or_label(exported):
    assert variable_problems("label_values(tandem_requests_total, model)", exported) == []
    assert variable_problems("label_values(tandem_nope_total, model)", exported) == [
        "tandem_nope_total is not exported"
    ]
    assert variable_problems("label_values(tandem_requests_total, pool)", exported) == [
        "tandem_requests_total has no label 'pool'"
    ]


def test_operations_doc_describes_every_tandem_metric():
    doc = OPERATIONS_DOC.read_text()
    families = ingress_families() + scan_ray_metrics(_tandem_sources()).families
    missing = [f.display_name for f in families if f"`{f.display_name}`" not in doc]
    assert not missing, f"docs/operations.md does not describe {missing}"
