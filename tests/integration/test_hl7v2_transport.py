"""The MLLP client against the real MLLP listener process (tests/integration/mllp_listener.py), no FHIR server:
TLS with a private CA, connection reuse, an ACK that never comes; and the folder transport on a real folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.hl7v2.files import FolderTransport
from adapter.hl7v2.mllp import AckTimeout, MllpClient, MllpSettings, TransportError, tls_context
from tests.unit.test_client_tls import pki  # noqa: F401  (the throwaway CA, server and client certificates)

from .helpers import wait_for
from .test_hl7v2 import Listener

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = [ROOT / "fixtures/fhir/scenarios" / name / "hl7v2.txt" for name in ("01-single-us", "02-us-three-lesions",
                                                                              "13-three-modalities")]


def wire(path: Path) -> tuple[str, str]:
    """(message with CR separators, its control id) of a golden file."""
    text = path.read_text().strip().replace("\n", "\r")
    return text, text.split("|")[9]


class TlsListener(Listener):
    def __init__(self, tmp: Path, cert: Path, key: Path) -> None:
        super().__init__(tmp)
        self.cert, self.key = cert, key

    def start(self) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "mllp_listener.py"), "--port", str(self.port), "--record",
             str(self.record), "--rules", str(self.rules), "--tls-cert", str(self.cert), "--tls-key", str(self.key)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("listening")


def test_messages_go_over_tls_on_one_reused_connection(tmp_path: Path, pki: dict[str, Path]) -> None:  # noqa: F811
    listener = TlsListener(tmp_path, pki["server"], pki["server_key"])
    listener.start()
    try:
        client = MllpClient(MllpSettings("127.0.0.1", listener.port, ack_timeout=10, tls=tls_context(str(pki["ca"]))))
        for path in GOLDEN:
            text, control = wire(path)
            ack = client.send(text, control)
            assert (ack.code, ack.control_id, ack.accepted) == ("AA", control, True)
        assert client.connections == 1  # one TLS handshake for all three
        assert [r["control_id"] for r in listener.records()] == [wire(p)[1] for p in GOLDEN]
        untrusted = MllpClient(MllpSettings("127.0.0.1", listener.port, tls=tls_context()))
        with pytest.raises(TransportError, match="TLS handshake failed"):
            untrusted.send(*wire(GOLDEN[0]))
        client.close()
    finally:
        listener.stop()


def test_no_ack_is_one_copy_and_a_late_ack_is_collected_from_the_kept_connection(tmp_path: Path) -> None:
    listener = Listener(tmp_path, [{"match": "", "answer": "AA", "delay": 1.0}])
    listener.start()
    try:
        client = MllpClient(MllpSettings("127.0.0.1", listener.port, ack_timeout=0.3))
        text, control = wire(GOLDEN[0])
        with pytest.raises(AckTimeout, match=r"no ACK within 0.3 s"):
            client.send(text, control)
        assert [r["control_id"] for r in listener.records()] == [control]  # the client never resends by itself
        assert client.late_acks() == []  # not yet
        other, other_control = wire(GOLDEN[1])
        with pytest.raises(AckTimeout):  # the next message goes on a new connection, never on the kept one
            client.send(other, other_control)
        assert client.connections == 2

        def collected() -> list[str]:
            got.extend(a.control_id for a in client.late_acks())
            return got if len(got) == 2 else []

        got: list[str] = []
        wait_for(collected, 10, "both late ACKs", every=0.1)
        assert sorted(got) == sorted([control, other_control])
        assert [r["control_id"] for r in listener.records()] == [control, other_control]  # one copy each
        client.close()
    finally:
        listener.stop()


def test_an_unreachable_receiver_is_a_transport_error(tmp_path: Path) -> None:
    listener = Listener(tmp_path)  # never started: nothing listens on its port
    client = MllpClient(MllpSettings("127.0.0.1", listener.port, connect_timeout=1))
    with pytest.raises(TransportError, match="cannot connect") as raised:
        client.send(*wire(GOLDEN[0]))
    assert not raised.value.sent  # nothing went out: no attempt counts against the message


def test_the_folder_transport_writes_each_message_whole_in_order(tmp_path: Path) -> None:
    folder = FolderTransport(tmp_path / "outbox")
    for seq, path in enumerate(GOLDEN, start=1):
        text, control = wire(path)
        ack = folder.send(text, control, seq)
        assert ack.accepted and ack.text == f"{seq:012d}-{control}.hl7"
    names = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert names == [f"{seq:012d}-{wire(p)[1]}.hl7" for seq, p in enumerate(GOLDEN, start=1)]  # no temporary left
    assert (tmp_path / "outbox" / names[1]).read_bytes() == wire(GOLDEN[1])[0].encode()
    again = folder.send(*wire(GOLDEN[1]), 2)  # a resend after a crash: the same file, the same bytes
    assert again.text == names[1] and len(list((tmp_path / "outbox").iterdir())) == 3
