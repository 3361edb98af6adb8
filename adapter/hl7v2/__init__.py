"""The HL7 v2 sink: charges as DFT^P03 messages to a billing system, beside (or instead of) the FHIR write-back.

tables.py    config/hl7v2.yaml (sender, receiver, version, value maps)
messages.py  what a session's charges carry (records) and the DFT^P03 built from them and strictly validated
checks.py    every value against hl7apy's reference (datatype, length, table), each message shape by hl7apy once
plan.py      corrections: which charges to send, which earlier ones to reverse (pure)
ledger.py    the durable record of every message (its own contract, SQLite and memory implementations)
mllp.py      the MLLP client: framing, ACKs, TLS, one reused connection
files.py     the folder transport, for engines that pick up files
sink.py      one pass: build, plan, record, deliver, and what went wrong for the service to act on
"""
