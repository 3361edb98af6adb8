"""A tiny thread-safe metrics registry rendered in the Prometheus text exposition format (0.0.4).

Small on purpose: the adapter needs a handful of counters and gauges, and an operator's Prometheus (or
a curl) must be able to read them without the adapter pulling in a client library. Counters only go up;
gauges are callbacks evaluated at scrape time, so they always show the current state (queue depth, cursor
lag) instead of a value someone forgot to update.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("adapter.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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
}
"""The adapter's counters (help, label names), declared up front so a scrape lists them before anything
happened: unlabelled ones at 0, labelled ones without samples until their first increment."""

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = tuple[tuple[str, str], ...]
GaugeCallback = Callable[[], float | int | None]


def _label_key(labels: dict[str, object]) -> LabelKey:
    for name in labels:
        if not _LABEL.match(name) or name.startswith("__"):
            raise ValueError(f"invalid metric label name {name!r}")
    return tuple(sorted((name, str(value)) for name, value in labels.items()))


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _series(name: str, key: LabelKey, value: float) -> str:
    if not key:
        return f"{name} {_format_value(value)}"
    labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in key)
    return f"{name}{{{labels}}} {_format_value(value)}"


@dataclass
class _Counter:
    help: str
    labels: tuple[str, ...] | None  # None: not declared, taken from the first increment
    values: dict[LabelKey, float] = field(default_factory=dict)


@dataclass
class _Gauge:
    help: str
    callbacks: dict[LabelKey, GaugeCallback] = field(default_factory=dict)


class Metrics:
    """Counters and callback gauges; every method may be called from any thread."""

    def __init__(self, counters: dict[str, tuple[str, tuple[str, ...]]] | None = None) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, _Counter] = {}
        self._gauges: dict[str, _Gauge] = {}
        for name, (help_text, label_names) in (COUNTERS if counters is None else counters).items():
            self.counter(name, help_text, label_names)

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        """Declare a counter and its label names, so typos in `inc` fail loudly instead of splitting a series.

        Idempotent: declaring it again only updates the help text.
        """
        _check_name(name)
        _label_key(dict.fromkeys(labels, ""))
        with self._lock:
            if name in self._gauges:
                raise ValueError(f"metric {name} is already a gauge")
            existing = self._counters.get(name)
            if existing is None:
                self._counters[name] = _Counter(help, tuple(sorted(labels)))
            elif existing.labels is not None and existing.labels != tuple(sorted(labels)):
                raise ValueError(f"counter {name} is already declared with labels {existing.labels}")
            else:
                existing.help = help
                existing.labels = tuple(sorted(labels))

    def inc(self, name: str, value: float = 1, **labels: object) -> None:
        """Add `value` (>= 0; 0 is allowed so callers can add counts without a branch) to a counter."""
        if value < 0 or math.isnan(value):
            raise ValueError(f"counter {name} can only go up (got {value})")
        key = _label_key(labels)
        with self._lock:
            counter = self._counters.get(name)
            if counter is None:
                _check_name(name)
                if name in self._gauges:
                    raise ValueError(f"metric {name} is a gauge")
                counter = self._counters[name] = _Counter(name.replace("_", " "), None)
            names = tuple(k for k, _ in key)
            if counter.labels is None:
                counter.labels = names
            elif counter.labels != names:
                raise ValueError(f"counter {name} takes labels {counter.labels}, got {names}")
            counter.values[key] = counter.values.get(key, 0) + value

    def gauge(self, name: str, callback: GaugeCallback, help: str, **labels: object) -> None:
        """Register (or replace) a gauge series computed by `callback` at each scrape.

        The callback returns a number, or None when there is nothing to report (the series is left out);
        an exception in it is logged and the series left out, so one broken gauge cannot break a scrape.
        """
        _check_name(name)
        key = _label_key(labels)
        with self._lock:
            if name in self._counters:
                raise ValueError(f"metric {name} is already a counter")
            gauge = self._gauges.setdefault(name, _Gauge(help))
            gauge.help = help
            gauge.callbacks[key] = callback

    def value(self, name: str, **labels: object) -> float:
        """Current value of a counter series (0 if never incremented); meant for tests and status output."""
        key = _label_key(labels)
        with self._lock:
            counter = self._counters.get(name)
            return counter.values.get(key, 0) if counter else 0

    def render(self) -> str:
        """The whole registry in Prometheus text format 0.0.4 (ends with a newline)."""
        with self._lock:
            counters = {name: (c.help, c.labels, dict(c.values)) for name, c in self._counters.items()}
            gauges = {name: (g.help, dict(g.callbacks)) for name, g in self._gauges.items()}
        lines: list[str] = []
        for name in sorted(counters):
            help_text, label_names, values = counters[name]
            lines += [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} counter"]
            if not values and not label_names:
                values = {(): 0}
            lines += [_series(name, key, values[key]) for key in sorted(values)]
        # callbacks run outside the lock: they may be slow (a database query) or use the registry themselves
        for name in sorted(gauges):
            help_text, callbacks = gauges[name]
            lines += [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} gauge"]
            for key in sorted(callbacks):
                try:
                    result = callbacks[key]()
                except Exception as exc:  # one line per scrape, not a traceback: scrapes come every few seconds
                    log.warning("gauge %s could not be computed: %s: %s", name, type(exc).__name__, exc)
                    continue
                if result is not None:
                    lines.append(_series(name, key, float(result)))
        return "\n".join(lines) + "\n"
