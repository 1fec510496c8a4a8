"""Reading a Metrics exposition as Prometheus would parse it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from rebalancer.metrics import Metrics

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scraped(metrics: Metrics) -> Series:
    """Every sample of the exposition, by name and labels (parsed as Prometheus would)."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def total(series: Series, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in series.items()
               if n == name and set(labels.items()) <= ls)
