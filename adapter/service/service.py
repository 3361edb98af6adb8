"""`Service`: the jobs of unattended operation put together on one state, client and set of sinks."""

from __future__ import annotations

from adapter.service.monitor import Monitor
from adapter.service.reconciler import Reconciler
from adapter.service.replay import Replayer
from adapter.service.subscription import Subscriber
from adapter.service.worker import Worker


class Service(Worker, Reconciler, Replayer, Monitor, Subscriber):
    """The poller, worker, reconciler, monitor, replay and subscription over one shared core
    (adapter/service/core.py). `run` and `serve` drive its loops (adapter/runner.py); `sync_patients`,
    `pass_record` and `retry_work` are the one pass they all record."""
