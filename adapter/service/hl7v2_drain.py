"""The HL7 v2 messages left pending are sent first, before each poll: a crash between recording and the ACK, or
a receiver that was down, leaves them in the ledger (adapter/hl7v2/sink.py)."""

from __future__ import annotations

from contextlib import suppress

from adapter.errors import StateError
from adapter.service.core import ServiceCore
from adapter.service.records import PassResult
from adapter.sync import SyncSummary, WriteFailure


class Hl7v2Drain(ServiceCore):
    def drain_hl7v2(self) -> SyncSummary:
        """Send the HL7 v2 messages left pending (a crash between recording and the ACK, a receiver that was
        down), oldest first, before anything new; what still fails is retried through the queue as usual."""
        summary = SyncSummary()
        if self.hl7v2 is None:
            return summary
        wanted = self.hl7v2.pending_patients()
        if not wanted:
            return summary
        with self.write_lock:
            claimed = self.state.claim_patients(wanted, self.owner, self.settings.worker.lease_seconds)
            try:
                result = self.hl7v2.drain([p for p in wanted if p in claimed])
            except BaseException:
                with suppress(StateError):
                    self.state.release_patients(claimed, self.owner)
                raise
        summary.hl7v2_sent, summary.hl7v2_credits = result.sent, result.credits
        summary.failures = [WriteFailure(f.session, f.procedures, f.reason, f.patients, f.retryable, f.kind, f.kind)
                            for f in result.failures]
        record, failing = self.pass_record(PassResult(summary, claimed))
        record.due += self.retry_work(failing)
        self._record_pass(record)
        return summary
