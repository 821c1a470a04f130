"""Scrape a daemon's ``/metrics`` over HTTP and read it with prometheus-client's own parser."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import DaemonProcess

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    """One scrape: its text, and every sample by (name, labels)."""

    text: str
    samples: dict[tuple[str, Labels], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name{labels}``; KeyError if the scrape has none."""
        return self.samples[(name, frozenset(labels.items()))]

    def total(self, name: str) -> float:
        """The sum of every sample named ``name`` (over all label values)."""
        return sum(value for (sample, _), value in self.samples.items() if sample == name)

    def names(self) -> set[str]:
        """Every sample name in the scrape."""
        return {name for name, _ in self.samples}


def metrics_port(daemon: DaemonProcess) -> int:
    """The port the daemon says it serves metrics on (``metrics_serving``; ``--metrics HOST:0``)."""
    [record] = daemon.wait_for("metrics_serving")
    return int(record["port"])


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    """GET /metrics and parse it (the parser raises on anything that is not the text format)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return Scrape(text, samples)
