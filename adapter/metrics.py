"""The adapter's metrics, on prometheus_client, rendered in the Prometheus text exposition format (0.0.4).

`Metrics` is one registry per service (tests make their own) with the small API the adapter uses: `inc` a
counter, `observe` a histogram, `gauge` a callback. Gauges are callbacks evaluated at scrape time, so they
always show the current state (queue depth, cursor lag) instead of a value someone forgot to update; one that
fails is logged and left out of that scrape. The registry also carries prometheus_client's process, platform
and garbage-collector metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

log = logging.getLogger("adapter.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

prometheus_client.disable_created_metrics()  # no `*_created` series: counters here start with the process

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "charge_adapter_received_total": ("Notifications accepted by the receiver, by what arrived", ("kind",)),
    "charge_adapter_enqueued_total": ("Work items the receiver put on the durable queue, by work kind", ("kind",)),
    "charge_adapter_rejected_total": ("Requests the receiver refused, by HTTP status", ("status",)),
    "charge_adapter_coded_total": ("Procedures coded", ()),
    "charge_adapter_written_total": ("ChargeItems and Claims written or voided on the server", ()),
    "charge_adapter_review_total": ("Procedures sent to the review queue", ()),
    "charge_adapter_failed_total": ("Sessions whose charges could not be written (rejected or to retry)", ()),
    "charge_adapter_failures_total": ("Failures by kind: fhir-unreachable, fhir-server, fhir-auth, fhir-conflict, "
                                      "fhir-rejected, state-unavailable, state, invalid-output, bug", ("kind",)),
    "charge_adapter_retried_total": ("Work put back to be retried after a failure (items and patients)", ()),
    "charge_adapter_verified_total": ("Writes whose answer was lost that the server was found to hold exactly", ()),
    "charge_adapter_credits_total": ("Credits written for billed lines whose coding changed", ()),
    "charge_adapter_reconcile_runs_total": ("Scheduled reconciliations finished", ()),
    "charge_adapter_drift_total": ("Differences scheduled reconciliations found between the coding and the server, "
                                   "by kind: missing, outdated, unknown, billed-wrong, changed-by-others", ("kind",)),
    "charge_adapter_claims_lost_total": ("Patients of a running pass another replica claimed because the pass "
                                         "outlived its lease before the renewal", ()),
}
"""The adapter's counters (help, label names), declared up front so a scrape lists them before anything
happened: unlabelled ones at 0, labelled ones without samples until their first increment."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: from a local SQLite commit (milliseconds) to a FHIR transaction retried through an outage."""

HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "charge_adapter_fhir_write_seconds": ("Time of one write to the FHIR server (a session's transaction, an update, "
                                          "a delete), retries included, by HTTP method", ("method",)),
    "charge_adapter_state_write_seconds": ("Time of recording one pass in the state (one transaction)", ()),
}

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

GaugeCallback = Callable[[], float | int | None]
LabelKey = tuple[tuple[str, str], ...]


def _label_key(labels: dict[str, object]) -> LabelKey:
    for name in labels:
        if not _LABEL.match(name) or name.startswith("__"):
            raise ValueError(f"invalid metric label name {name!r}")
    return tuple(sorted((name, str(value)) for name, value in labels.items()))


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")


class _CallbackGauges(Collector):
    """Gauges computed at scrape time; callbacks run outside any lock (they may be slow, e.g. a query)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gauges: dict[str, tuple[str, dict[LabelKey, GaugeCallback]]] = {}

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            gauges = {name: (help_text, dict(callbacks)) for name, (help_text, callbacks) in self.gauges.items()}
        for name in sorted(gauges):
            help_text, callbacks = gauges[name]
            label_names = [k for k, _ in next(iter(callbacks))] if callbacks else []
            family = GaugeMetricFamily(name, help_text, labels=label_names)
            for key in sorted(callbacks):
                try:
                    value = callbacks[key]()
                except Exception as exc:  # one line per scrape, not a traceback: scrapes come every few seconds
                    log.warning("gauge %s could not be computed: %s: %s", name, type(exc).__name__, exc)
                    continue
                if value is not None:
                    family.add_metric([v for _, v in key], float(value))
            yield family


class Metrics:
    """Counters, histograms and callback gauges in one prometheus_client registry; thread-safe."""

    def __init__(self, counters: dict[str, tuple[str, tuple[str, ...]]] | None = None, *,
                 process: bool = True) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._counters: dict[str, Counter] = {}
        self._label_names: dict[str, tuple[str, ...]] = {}
        self._histograms: dict[str, Histogram] = {}
        self._gauges = _CallbackGauges()
        self.registry.register(self._gauges)
        if process:  # CPU, memory, open files, start time; the interpreter; the garbage collector
            prometheus_client.ProcessCollector(registry=self.registry)
            prometheus_client.PlatformCollector(registry=self.registry)
            prometheus_client.GCCollector(registry=self.registry)
        for name, (help_text, label_names) in (COUNTERS if counters is None else counters).items():
            self.counter(name, help_text, label_names)
        for name, (help_text, label_names) in HISTOGRAMS.items():
            self.histogram(name, help_text, label_names)

    def _free(self, name: str, kind: str) -> None:
        _check_name(name)
        for other, taken in (("counter", self._counters), ("histogram", self._histograms),
                             ("gauge", self._gauges.gauges)):
            if other != kind and name in taken:
                raise ValueError(f"metric {name} is already a {other}")

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        """Declare a counter and its label names, so typos in `inc` fail loudly instead of splitting a series.
        Idempotent for the same label names."""
        _label_key(dict.fromkeys(labels, ""))
        with self._lock:
            self._free(name, "counter")
            existing = self._counters.get(name)
            if existing is None:
                self._counters[name] = Counter(name, help, sorted(labels), registry=self.registry)
                self._label_names[name] = tuple(sorted(labels))
            elif self._label_names[name] != tuple(sorted(labels)):
                raise ValueError(f"counter {name} is already declared with labels {self._label_names[name]}")

    def histogram(self, name: str, help: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        """Declare a histogram (of seconds, by default buckets); idempotent."""
        _label_key(dict.fromkeys(labels, ""))
        with self._lock:
            self._free(name, "histogram")
            if name not in self._histograms:
                self._histograms[name] = Histogram(name, help, sorted(labels), registry=self.registry,
                                                   buckets=buckets)

    def inc(self, name: str, value: float = 1, **labels: object) -> None:
        """Add `value` (>= 0; 0 is allowed so callers can add counts without a branch) to a counter; a counter
        not declared is declared by its first increment, with the label names it was given."""
        if value < 0 or math.isnan(value):
            raise ValueError(f"counter {name} can only go up (got {value})")
        key = _label_key(labels)
        counter = self._counters.get(name)
        if counter is None:
            self.counter(name, name.replace("_", " "), tuple(k for k, _ in key))
            counter = self._counters[name]
        names = tuple(k for k, _ in key)
        if self._label_names[name] != names:
            raise ValueError(f"counter {name} takes labels {self._label_names[name]}, got {names}")
        (counter.labels(**dict(key)) if key else counter).inc(value)

    def observe(self, name: str, value: float, **labels: object) -> None:
        """One observation (seconds) of a declared histogram."""
        histogram = self._histograms[name]
        key = _label_key(labels)
        (histogram.labels(**dict(key)) if key else histogram).observe(value)

    def gauge(self, name: str, callback: GaugeCallback, help: str, **labels: object) -> None:
        """Register (or replace) a gauge series computed by `callback` at each scrape.

        The callback returns a number, or None when there is nothing to report (the series is left out);
        an exception in it is logged and the series left out, so one broken gauge cannot break a scrape.
        """
        key = _label_key(labels)
        with self._lock:
            self._free(name, "gauge")
            with self._gauges.lock:
                _, callbacks = self._gauges.gauges.setdefault(name, (help, {}))
                callbacks[key] = callback
                self._gauges.gauges[name] = (help, callbacks)

    def value(self, name: str, **labels: object) -> float:
        """Current value of a counter series (0 if never incremented); meant for tests and status output."""
        counter = self._counters.get(name)
        if counter is None:
            return 0
        wanted = dict(_label_key(labels))
        sample = name if name.endswith("_total") else f"{name}_total"
        for metric in counter.collect():
            for found in metric.samples:
                if found.name == sample and found.labels == wanted:
                    return found.value
        return 0

    def render(self) -> str:
        """The whole registry in Prometheus text format 0.0.4 (ends with a newline)."""
        return prometheus_client.generate_latest(self.registry).decode("utf-8")
