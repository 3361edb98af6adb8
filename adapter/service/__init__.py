"""Unattended operation: polling with a durable cursor, working off received and failed work, recording
every pass in one transaction.

The engine and writer are the ones `sync` uses; this layer adds what running for months needs: the cursor
(server clock only), de-duplication on Procedure id + versionId, the work queue and its retries, the review
queue, the audit log, claims on patients, and health reports. A write that fails for a passing reason is
never recorded as done: its patient (or the received item, with what was pushed) stays queued and is
retried with backoff until it succeeds; only a rejection of our data goes to an analyst.

One module per job: core.py (what they share: one pass and its record), poller.py, worker.py, reconciler.py,
hl7v2_drain.py, monitor.py (heartbeat, stats, pruning, status), replay.py, subscription.py; service.py puts them
together; connect.py builds the FHIR client of the settings.
"""

from adapter.service.connect import make_client
from adapter.service.monitor import MONITOR_EVERY_SECONDS, PRUNE_EVERY_SECONDS
from adapter.service.poller import POLL_ROLE, POLL_ROLE_MIN_SECONDS
from adapter.service.reconciler import RECONCILE_FROM
from adapter.service.records import PassResult, Status, WorkPlan, parse_instant, pushed_for
from adapter.service.service import Service
from adapter.service.worker import BATCH_GROWS_AFTER

__all__ = [
    "BATCH_GROWS_AFTER",
    "MONITOR_EVERY_SECONDS",
    "POLL_ROLE",
    "POLL_ROLE_MIN_SECONDS",
    "PRUNE_EVERY_SECONDS",
    "RECONCILE_FROM",
    "PassResult",
    "Service",
    "Status",
    "WorkPlan",
    "make_client",
    "parse_instant",
    "pushed_for",
]
