"""A real MLLP receiver in its own process, for the HL7 v2 sink's tests: not our client code, but the `hl7`
package's asyncio MLLP server (framing, parsing, ACK creation), so what our client sends is read by an
independent implementation.

    python tests/integration/mllp_listener.py --port 6661 --record received.jsonl [--rules rules.json]
        [--tls-cert cert.pem --tls-key key.pem]

Every message received is appended to the record file (one JSON line: control id, the message text, the
answer given) before it is answered. Answers follow the rules file, a JSON list checked in order:
`{"match": "<text the message contains>", "answer": "AE" | "AR" | "silence", "text": "...", "count": n,
"delay": seconds}` (`count`: only the first n messages that match; `"match": ""` matches every message); no
rule: AA. `silence` keeps the message and answers nothing (the sender's ACK timeout); `delay` answers that
much later, on the same connection (a slow receiver: its ACKs come late). Prints `listening <port>` once
ready. Stops on SIGTERM/SIGINT (or dies on SIGKILL, as a receiver that crashes does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
from pathlib import Path
from typing import Any

from hl7.mllp import start_hl7_server


class Rules:
    def __init__(self, rules: list[dict[str, Any]]) -> None:
        self.rules = rules
        self.used = [0] * len(rules)

    def answer(self, text: str) -> tuple[str, str, float]:
        for n, rule in enumerate(self.rules):
            if rule.get("match", "") in text and ("count" not in rule or self.used[n] < rule["count"]):
                self.used[n] += 1
                return rule["answer"], rule.get("text", ""), float(rule.get("delay", 0))
        return "AA", "", 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--rules")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    rules = Rules(json.loads(Path(args.rules).read_text()) if args.rules else [])
    record = Path(args.record)

    async def on_client(reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                text = str(message)
                answer, why, delay = rules.answer(text)
                control_id = str(message.segment("MSH")(10))
                with record.open("a", encoding="utf-8") as out:
                    out.write(json.dumps({"control_id": control_id, "text": text, "answer": answer}) + "\n")
                if answer == "silence":
                    continue
                if delay:
                    await asyncio.sleep(delay)
                ack = message.create_ack(answer)
                if why:
                    ack.segment("MSA").assign_field(why, 3)
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve() -> None:
        context = None
        if args.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(args.tls_cert, args.tls_key)
        server = await start_hl7_server(on_client, args.host, args.port, encoding="utf-8", ssl=context)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"listening {args.port}", flush=True)
        async with server:
            await stop.wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
