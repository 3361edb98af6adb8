"""One pass of the HL7 v2 sink for some patients: flush what is pending, plan corrections, record, send.

Per patient, in this order, so one patient's messages always arrive in the order they were planned:

1. pending messages (recorded earlier, never acknowledged: a crash, a receiver that was down) are sent
   first, with their stored bytes and control ids. Until they are through nothing new is planned for the
   patient (the plan needs to know what the receiver holds).
2. the patient's coded sessions are compared with what earlier messages charged (`plan.plan_patient`):
   credits of voided or changed charges, then the new charges.
3. the new messages are recorded in the ledger (one transaction), and only then sent; each is marked sent
   after its ACK. AE/AR: the message is rejected (its reason goes to review) and the patient's later
   messages are cancelled. No ACK in time: it stays pending, backing off (`sinks.hl7v2.resend_initial_seconds`,
   doubling with jitter up to `resend_max_seconds`) before it is sent again, with the same control id; the
   patient's later messages wait behind it, the other patients' go on. An ACK that arrives late (on the
   connection the MLLP client keeps for it) settles the message without a resend. After `attempts` sends
   without an ACK the message waits in review as `hl7v2-unacknowledged`; replaying the entry sends it again.
   No connection at all: the pass sends nothing more to the receiver (its other patients are retried too), so
   an outage costs one connection attempt, not one per patient, and counts no attempt against the bound.

Every send's outcome goes to `observer` (the health board: /healthz names a receiver that keeps failing).

A refusal holds the patient (`Ledger.holds`): until the refusal's review entry is replayed (`release_replayed`,
called by `review replay`), later passes send nothing new for that patient, whatever changed: what they
would have sent is reported as held (a refusal, so the entry stays open) and is planned again, from what the
receiver holds, by the replay. Re-sending refused content on every recode would only be refused again, under
new control ids, while the analyst has not looked.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from adapter.coding.engine import Review
from adapter.config import CodeTables
from adapter.hl7v2.ledger import PARKED, Ledger, LedgerMessage, MessageStatus, NewMessage
from adapter.hl7v2.messages import CREDIT, InvalidMessageError, SessionCharges, render, session_charges
from adapter.hl7v2.mllp import Ack, TransportError
from adapter.hl7v2.plan import plan_patient
from adapter.runner import backoff

log = logging.getLogger("adapter.hl7v2")

UNREACHABLE, REJECTED, DEFERRED = "hl7v2-unreachable", "hl7v2-rejected", "hl7v2-deferred"
UNACKNOWLEDGED = "hl7v2-unacknowledged"
"""The review reason of a message sent `attempts` times without an ACK (replay sends it again)."""


def from_settings(conf: Any, source: str, tables: CodeTables, state: Any) -> Hl7v2Sink:
    """The sink of `sinks.hl7v2` (adapter.settings.Hl7v2SinkSettings), with its ledger in `state`."""
    import ssl

    from adapter.errors import ConfigError
    from adapter.hl7v2.files import FolderTransport
    from adapter.hl7v2.ledgers import open_ledger
    from adapter.hl7v2.mllp import MllpClient, MllpSettings, tls_context

    transport: Transport
    if conf.transport == "file":
        transport = FolderTransport(conf.folder)
    else:
        context = None
        if conf.tls:
            try:
                context = tls_context(conf.ca_bundle, conf.client_cert)
            except (OSError, ssl.SSLError) as exc:
                key = "sinks.hl7v2.client_cert" if conf.client_cert else "sinks.hl7v2.ca_bundle"
                raise ConfigError(source, key, f"cannot be used for TLS ({exc})") from None
        transport = MllpClient(MllpSettings(conf.host, conf.port, conf.connect_timeout_seconds,
                                            conf.ack_timeout_seconds, context, conf.server_name,
                                            linger=conf.resend_max_seconds + conf.ack_timeout_seconds))
    return Hl7v2Sink(tables, open_ledger(state), transport, attempts=conf.attempts,
                     resend=(conf.resend_initial_seconds, conf.resend_max_seconds))


class Transport(Protocol):
    where: str

    def send(self, text: str, control_id: str, seq: int = 0) -> Ack: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SinkFailure:
    """Messages that did not go through: `retryable` (no answer: they stay pending) or refused (AE/AR: review)."""

    session: str
    procedures: tuple[str, ...]
    reason: str
    patients: tuple[str, ...]
    retryable: bool
    kind: str


@dataclass
class SinkResult:
    reviews: list[Review] = field(default_factory=list)
    """Sessions whose message needs what the input lacks (MRN, visit number, NPI, diagnosis ...)."""
    failures: list[SinkFailure] = field(default_factory=list)
    sent: int = 0
    credits: int = 0
    """Of `sent`: credits (FT1-6 CD) of earlier charges."""
    unchanged: int = 0
    protected: int = 0

    @property
    def messages(self) -> int:
        return self.sent


class Hl7v2Sink:
    def __init__(self, tables: CodeTables, ledger: Ledger, transport: Transport,
                 clock: Callable[[], datetime] | None = None, *, attempts: int = 8,
                 resend: tuple[float, float] = (30.0, 600.0),
                 rng: Callable[[], float] = random.random) -> None:
        self.tables = tables
        self.ledger = ledger
        self.transport = transport
        self.clock = clock or (lambda: datetime.now(UTC))
        self.attempts = attempts
        self.resend = resend
        self.rng = rng
        self.observer: Callable[[bool, str], None] | None = None
        """Told of every send: (True, "") for an answer, (False, reason) for none."""

    def close(self) -> None:
        self.transport.close()

    def deliver(self, report: Any, patients: Iterable[str],
                should_stop: Callable[[], bool] | None = None) -> SinkResult:
        """Bring the receiver in line with `report` (a RunReport holding every FNA Procedure of `patients`)."""
        result = SinkResult()
        sessions, result.reviews = session_charges(report, self.tables)
        under_review = {r.procedure for r in report.reviews} | {r.procedure for r in result.reviews}
        by_patient: dict[str, list[SessionCharges]] = {}
        for sc in sessions:
            by_patient.setdefault(sc.patient, []).append(sc)
        now = self.clock()

        def make(kind: str, visit: Any, charges: list[Any], control: str) -> str:
            return render(kind, visit, charges, control, now, self.tables.hl7v2)

        down: list[str] = []
        for patient in sorted({*patients, *by_patient}):
            if should_stop is not None and should_stop():
                result.failures.append(self._not_sent(patient, by_patient.get(patient, []), DEFERRED,
                                                      "not sent: the process is stopping"))
                continue
            if not self._flush(patient, result, down):
                continue
            try:
                plan = plan_patient(patient, by_patient.get(patient, []), self.ledger.history(patient), under_review,
                                    make)
            except InvalidMessageError as exc:
                result.reviews += [Review(p, p, "hl7v2-invalid-message", str(exc))
                                   for sc in by_patient.get(patient, []) for p in sc.procedures]
                continue
            holds = self.ledger.holds(patient)
            if holds:
                result.failures += self._held(patient, holds, plan.messages)
                continue
            result.unchanged += plan.unchanged
            result.protected += plan.protected
            if plan.messages:
                self.ledger.record(plan.messages)
                self._flush(patient, result, down)
        return result

    def release_replayed(self, entries: Iterable[Any]) -> set[str]:
        """Lift the hold of the patients whose refusal entries (`hl7v2-rejected` review entries) are being replayed,
        before the replay's pass: it then plans and sends again. Returns those patients."""
        patients = {p for e in entries if getattr(e, "reason", None) == REJECTED for p in e.patients}
        if patients:
            self.ledger.release(patients)
        unacknowledged = {p for e in entries if getattr(e, "reason", None) == UNACKNOWLEDGED for p in e.patients}
        if unacknowledged:  # sent again, with its control id, by the replay's pass
            self.ledger.unpark(unacknowledged)
        return patients | unacknowledged

    def pending_patients(self, limit: int = 10_000) -> list[str]:
        """Patients with messages recorded and never acknowledged, in ledger order."""
        return list(dict.fromkeys(m.patient for m in self.ledger.pending(limit=limit)))

    def drain(self, patients: Iterable[str]) -> SinkResult:
        """Send what is pending for `patients` (a crash, an outage), in ledger order; plans nothing new."""
        result = SinkResult()
        down: list[str] = []
        for patient in patients:
            self._flush(patient, result, down)
        return result

    def _not_sent(self, patient: str, sessions: list[SessionCharges] | list[LedgerMessage], kind: str,
                  reason: str) -> SinkFailure:
        procedures = tuple(sorted({p for s in sessions for p in s.procedures}))
        label = sessions[0].session if sessions else f"HL7 v2 messages of {patient}"
        return SinkFailure(label, procedures, reason, (patient,), True, kind)

    def _held(self, patient: str, holds: list[LedgerMessage], planned: list[NewMessage]) -> list[SinkFailure]:
        """A refusal (and so a review entry) per session with something to send, and per refused message's session:
        the entries stay open (their text names the receiver's answer) until they are replayed."""
        last = holds[-1]
        reason = (f"held: nothing more is sent to HL7 v2 receiver {self.transport.where} for this patient until the "
                  f"review entry of the refused DFT^P03 {last.control_id} is replayed (charge-adapter review replay); "
                  f"it answered {last.ack_code}: {last.ack_text or 'no reason given'}")
        procedures: dict[str, set[str]] = {}
        for message in [*holds, *planned]:
            procedures.setdefault(message.session, set()).update(message.procedures)
        if planned:
            log.info("HL7 v2 messages of a patient with a refused DFT^P03 are held until it is replayed (%d not "
                     "sent)", len(planned))
        return [SinkFailure(session, tuple(sorted(procs)), reason, (patient,), False, REJECTED)
                for session, procs in procedures.items()]

    def _observe(self, reachable: bool, reason: str = "") -> None:
        if self.observer is not None:
            try:
                self.observer(reachable, reason)
            except Exception:  # an observer must never break a send
                log.warning("HL7 v2 observer failed", exc_info=True)

    def _late_acks(self, result: SinkResult) -> None:
        """Settle the messages whose ACK came late (the MLLP client kept their connections open for it)."""
        collect = getattr(self.transport, "late_acks", None)
        for ack in collect() if collect is not None else []:
            message = self.ledger.message(ack.control_id)
            if message is not None and message.status == MessageStatus.PENDING:
                log.info("DFT^P03 %s acknowledged late (%s): not sent again", ack.control_id, ack.code)
                self._settle(message, ack, result)

    def _settle(self, message: LedgerMessage, ack: Ack, result: SinkResult) -> bool:
        """Record the receiver's answer; True when it took the message."""
        if ack.accepted:
            self.ledger.acknowledged(message.control_id, ack.code, ack.text)
            result.sent += 1
            result.credits += message.kind == CREDIT
            return True
        cancelled = self.ledger.rejected(message.control_id, ack.code, ack.text)
        what = "credit of earlier charges" if message.kind == CREDIT else "charges"
        lines = ", ".join(c["charge"]["code"]["code"] for c in message.charges)
        after = f"; {len(cancelled)} later message(s) of the patient cancelled" if cancelled else ""
        reason = (f"HL7 v2 receiver {self.transport.where} answered {ack.code} to DFT^P03 {message.control_id} "
                  f"({what}: {lines}): {ack.text or 'no reason given'}{after}")
        log.warning("DFT^P03 %s refused with %s (review)", message.control_id, ack.code)
        result.failures.append(SinkFailure(message.session, message.procedures, reason, (message.patient,), False,
                                           REJECTED))
        return False

    def _unacknowledged(self, message: LedgerMessage, pending: list[LedgerMessage]) -> SinkFailure:
        procedures = tuple(sorted({p for m in pending for p in m.procedures}))
        reason = (f"DFT^P03 {message.control_id} was sent {message.attempts} time(s) to HL7 v2 receiver "
                  f"{self.transport.where} without an ACK (last: {message.last_error}); it waits until this entry "
                  "is replayed (charge-adapter review replay), which sends it again with the same control id")
        return SinkFailure(message.session, procedures, reason, (message.patient,), False, UNACKNOWLEDGED)

    def _flush(self, patient: str, result: SinkResult, down: list[str]) -> bool:
        """Send the patient's pending messages in order; True when none is left pending."""
        if not down:
            self._late_acks(result)
        pending = self.ledger.pending(patient)
        for n, message in enumerate(pending):
            if down:
                result.failures.append(self._not_sent(patient, pending[n:], UNREACHABLE,
                                                      f"not sent: {down[0]}"))
                return False
            if message.parked:
                result.failures.append(self._unacknowledged(message, pending[n:]))
                return False
            if not message.due:  # backing off after a send without an ACK; its later messages wait behind it
                result.failures.append(self._not_sent(patient, pending[n:], UNREACHABLE,
                                                      f"DFT^P03 {message.control_id} backs off before it is sent "
                                                      f"again (attempt {message.attempts}: {message.last_error})"))
                return False
            try:
                ack = self.transport.send(message.text, message.control_id, message.seq)
            except TransportError as exc:
                self._observe(False, str(exc))
                if not exc.sent:  # nobody reached: the receiver is down, the pass stops sending
                    self.ledger.unreached(message.control_id, str(exc))
                    down.append(str(exc))
                    log.info("HL7 v2 receiver not reached (DFT^P03 %s stays pending): %s", message.control_id, exc)
                    result.failures.append(self._not_sent(patient, pending[n:], UNREACHABLE, str(exc)))
                    return False
                attempts = message.attempts + 1
                if attempts >= self.attempts:
                    self.ledger.attempt_failed(message.control_id, str(exc), PARKED)
                    log.warning("DFT^P03 %s got no ACK after %d sends: it waits in review (%s)",
                                message.control_id, attempts, UNACKNOWLEDGED)
                    stored = self.ledger.message(message.control_id) or message
                    result.failures.append(self._unacknowledged(stored, pending[n:]))
                    return False
                delay = backoff(attempts, *self.resend, rng=self.rng)
                self.ledger.attempt_failed(message.control_id, str(exc), delay)
                log.info("DFT^P03 %s stays pending, sent again in %.0f s at the earliest (%d of %d): %s",
                         message.control_id, delay, attempts, self.attempts, exc)
                result.failures.append(self._not_sent(patient, pending[n:], UNREACHABLE,
                                                      f"{exc}; sent again in {delay:.0f} s"))
                return False  # this patient waits; the others go on
            self._observe(True)
            if not self._settle(message, ack, result):
                return False
        return True
