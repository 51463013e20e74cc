"""deploy/grafana/kvtier.json without a server: every kvtier series it queries is one kvtier exports
(a counter as ``_total``, a gauge as it is), panels do not overlap, and every query is filtered by
the dashboard's model. tests/e2e/test_vllm_metrics.py checks its queries against a running server."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kvtier.metrics import FAMILIES

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvtier.json"


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_kvtier_series_queried_is_exported() -> None:
    exported = {f"vllm:{f.name}_total" if f.kind == "counter" else f"vllm:{f.name}" for f in FAMILIES}
    queried = {name for expr in exprs(load()) for name in re.findall(r"vllm:kvtier_[A-Za-z0-9_]+", expr)}
    assert queried and queried <= exported, sorted(queried - exported)
    for family in ("kvtier_hits", "kvtier_used_bytes", "kvtier_queue_depth", "kvtier_errors",
                   "kvtier_remote_unhealthy"):
        assert any(family in name for name in queried), family


def test_every_query_is_filtered_by_the_model_variable() -> None:
    dashboard = load()
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model_name"]
    for expr in exprs(dashboard):
        for selector in re.findall(r"vllm:[A-Za-z0-9_:]+(\{[^}]*\})?", expr):
            assert selector == '{model_name=~"$model_name"}', expr


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = load()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = [(x, y) for panel in panels for pos in [panel["gridPos"]]
             for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])]
    assert len(cells) == len(set(cells))
    assert all(panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24 for panel in panels)
