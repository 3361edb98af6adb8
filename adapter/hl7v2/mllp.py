"""The MLLP client: one framed message out, its ACK back, over one reused connection (TLS when configured).

MLLP (HL7 v2 Minimal Lower Layer Protocol): a message is sent as <VT> message <FS><CR>, and the receiver
answers with an ACK framed the same way. The ACK must name our MSH-10 in MSA-2; MSA-1 says how it went:
AA (or CA) taken, AE/AR (CE/CR) refused with a reason (MSA-3 and the ERR segments). No ACK within the
timeout, a dropped connection or an ACK for another message -> `TransportError` (its `sent` says whether the
message may have reached the receiver): the message stays pending in the ledger and the sink sends it again
later, after a backoff, with the same control id (receivers de-duplicate on MSH-10). The client never resends
by itself: each resend is a copy at the receiver.

A connection whose ACK did not come in time is never used for another message (its late ACK would be taken
for the next message's), but it is kept open for a while (`linger`): `late_acks()` collects ACKs that arrive
on it late, so a slow receiver's ACK still settles its message and no copy needs to be sent.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass

from adapter.errors import AdapterError
from adapter.waits import waiting_on

log = logging.getLogger("adapter.hl7v2.mllp")

START, END = b"\x0b", b"\x1c\x0d"
ACCEPTED = ("AA", "CA")
REFUSED = ("AE", "AR", "CE", "CR")
MAX_ACK_BYTES = 1024 * 1024


class TransportError(AdapterError):
    """No usable answer from the receiver (unreachable, no ACK in time, a garbled ACK): retry later.
    `sent`: the message may have reached the receiver (False: no connection, nothing went out)."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class AckTimeout(TransportError):
    """The message went out and no ACK came within the timeout (it may still come, late)."""


@dataclass(frozen=True)
class Ack:
    code: str
    """MSA-1 (AA, AE, AR, CA, CE, CR), or `written` for the folder transport."""
    control_id: str
    text: str = ""
    """MSA-3 and the ERR segments' texts: why a message was refused."""

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED or self.code == "written"


def _unescape(value: str) -> str:
    for escaped, raw in (("\\F\\", "|"), ("\\S\\", "^"), ("\\T\\", "&"), ("\\R\\", "~"), ("\\E\\", "\\")):
        value = value.replace(escaped, raw)
    return value


def parse_ack(data: bytes) -> Ack:
    """MSA-1, MSA-2 and the error text of an ACK; raises TransportError when it is none."""
    text = data.decode("utf-8", errors="replace")
    segments = [s for s in text.replace("\n", "\r").split("\r") if s.strip()]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise TransportError(f"the answer is not an HL7 message ({text[:40]!r})")
    field_sep, component_sep = segments[0][3], segments[0][4]
    msa = next((s.split(field_sep) for s in segments if s.startswith("MSA" + field_sep)), None)
    if msa is None or len(msa) < 3:
        raise TransportError("the answer has no MSA segment with an acknowledgment code and a control id")
    code = msa[1].strip()
    if code not in (*ACCEPTED, *REFUSED):
        raise TransportError(f"the answer's MSA-1 is {code[:10]!r}, not an acknowledgment code")
    reasons = [msa[3]] if len(msa) > 3 and msa[3].strip() else []
    for segment in segments:
        if segment.startswith("ERR" + field_sep):
            for value in segment.split(field_sep)[1:]:
                parts = [p for p in value.split(component_sep) if p.strip()]
                if parts:
                    reasons.append(" ".join(parts))
    return Ack(code, msa[2].strip(), "; ".join(_unescape(r.strip()) for r in reasons))


@dataclass(frozen=True)
class MllpSettings:
    host: str
    port: int
    connect_timeout: float = 5.0
    ack_timeout: float = 30.0
    tls: ssl.SSLContext | None = None
    server_name: str = ""
    linger: float = 600.0
    """How long a connection whose ACK timed out is kept open for the late ACK."""


MAX_LINGERING = 32
"""Connections kept open for late ACKs at most (the oldest is closed first)."""


@dataclass
class _Lingering:
    sock: socket.socket
    control_id: str
    until: float
    buffer: bytes = b""


def _take_frame(buffer: bytes) -> tuple[bytes | None, bytes]:
    """The first complete frame's content and what follows it, or (None, buffer)."""
    start = buffer.find(START)
    end = buffer.find(END, start + 1) if start >= 0 else -1
    if start >= 0 and end >= 0:
        return buffer[start + 1:end], buffer[end + len(END):]
    return None, buffer


class MllpClient:
    """One connection, kept open between messages and opened again after any failure. Not thread-safe: the
    sink sends one message at a time (messages of one patient must arrive in order anyway)."""

    def __init__(self, settings: MllpSettings) -> None:
        self.settings = settings
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._lingering: list[_Lingering] = []
        self.connections = 0
        """Connections opened so far (for tests and metrics: reuse keeps this low)."""

    @property
    def where(self) -> str:
        return f"mllp{'s' if self.settings.tls else ''}://{self.settings.host}:{self.settings.port}"

    def _connect(self) -> socket.socket:
        conf = self.settings
        try:
            raw = socket.create_connection((conf.host, conf.port), timeout=conf.connect_timeout)
        except OSError as exc:
            raise TransportError(f"{self.where}: cannot connect ({exc.strerror or exc})", sent=False) from None
        sock: socket.socket = raw
        if conf.tls is not None:
            try:
                sock = conf.tls.wrap_socket(raw, server_hostname=conf.server_name or conf.host)
            except (OSError, ssl.SSLError) as exc:
                raw.close()
                raise TransportError(f"{self.where}: TLS handshake failed ({exc})", sent=False) from None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.connections += 1
        self._buffer = b""
        return sock

    def close(self) -> None:
        """Close the connection and every one kept for a late ACK."""
        self._drop()
        for late in self._lingering:
            with contextlib.suppress(OSError):
                late.sock.close()
        self._lingering = []

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
            self._buffer = b""

    def _linger(self, control_id: str) -> None:
        """Keep the current connection for the late ACK of `control_id`; the next message gets a new one."""
        if self._sock is None:
            return
        self._lingering.append(_Lingering(self._sock, control_id, time.monotonic() + self.settings.linger,
                                          self._buffer))
        self._sock, self._buffer = None, b""
        while len(self._lingering) > MAX_LINGERING:
            with contextlib.suppress(OSError):
                self._lingering.pop(0).sock.close()

    def late_acks(self) -> list[Ack]:
        """ACKs that arrived late on kept connections (without waiting); each such connection is then closed."""
        acks: list[Ack] = []
        now = time.monotonic()
        for late in list(self._lingering):
            done = now > late.until
            try:
                late.sock.setblocking(False)
                while True:
                    chunk = late.sock.recv(65536)
                    if not chunk:
                        done = True
                        break
                    late.buffer += chunk
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            except OSError:
                done = True
            frame, late.buffer = _take_frame(late.buffer)
            if frame is not None:
                try:
                    ack = parse_ack(frame)
                except TransportError as exc:
                    log.info("a late answer for DFT^P03 %s is no ACK: %s", late.control_id, exc)
                else:
                    if ack.control_id == late.control_id:
                        acks.append(ack)
                done = True
            if done:
                self._lingering.remove(late)
                with contextlib.suppress(OSError):
                    late.sock.close()
        return acks

    def _read_frame(self, sock: socket.socket, deadline: float) -> bytes:
        while True:
            frame, self._buffer = _take_frame(self._buffer)
            if frame is not None:
                return frame
            if len(self._buffer) > MAX_ACK_BYTES:
                raise TransportError(f"{self.where}: an answer of more than {MAX_ACK_BYTES} bytes without a frame end")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AckTimeout(f"{self.where}: no ACK within {self.settings.ack_timeout:g} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AckTimeout(f"{self.where}: no ACK within {self.settings.ack_timeout:g} s") from None
            except OSError as exc:
                raise TransportError(f"{self.where}: connection lost waiting for the ACK ({exc})") from None
            if not chunk:
                raise TransportError(f"{self.where}: the receiver closed the connection before it acknowledged")
            self._buffer += chunk

    def _exchange(self, payload: bytes, control_id: str) -> Ack:
        reused = self._sock is not None
        if self._sock is None:
            self._sock = self._connect()
        sock = self._sock
        try:
            sock.sendall(payload)
        except OSError as exc:
            self._drop()
            if reused:  # the receiver closed an idle connection: a new one, not a failed attempt
                return self._exchange(payload, control_id)
            raise TransportError(f"{self.where}: sending failed ({exc})", sent=False) from None
        ack = parse_ack(self._read_frame(sock, time.monotonic() + self.settings.ack_timeout))
        if ack.control_id != control_id:
            raise TransportError(f"{self.where}: the ACK names {ack.control_id[:20]!r}, not {control_id}")
        return ack

    def send(self, text: str, control_id: str, seq: int = 0) -> Ack:
        """Send one message once and return its ACK; raises TransportError. (`seq`, the ledger's sequence
        number, names files in the folder transport; MLLP needs none.)"""
        payload = START + text.encode("utf-8") + END
        try:
            with waiting_on(f"the HL7 v2 receiver {self.where}"):
                return self._exchange(payload, control_id)
        except TransportError as exc:
            if isinstance(exc, AckTimeout):
                self._linger(control_id)  # its ACK may still come: kept apart, never reused
            else:
                self._drop()  # never reuse a connection that may still carry an answer to this message
            log.info("DFT^P03 %s: %s", control_id, exc)
            raise


def tls_context(ca_bundle: str = "", client_cert: str = "") -> ssl.SSLContext:
    """Verification always on: the system's CAs, or `ca_bundle`; `client_cert` (PEM with key) for mutual TLS."""
    context = ssl.create_default_context(cafile=ca_bundle or None)
    if client_cert:
        context.load_cert_chain(client_cert)
    return context
