"""The DFT^P03 builder as it was before the string builder: an hl7apy `Message` filled field by field, written
with `to_er7` and validated strictly. The equivalence tests hold `messages.render` to its output, byte for byte
(and to its verdict: what this one refuses, the string builder refuses)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from adapter.hl7v2.messages import (
    CHARGE,
    CREDIT,
    Charge,
    Coded,
    InvalidMessageError,
    Visit,
    _cx,
    _money,
    _strictly_valid,
    escape,
    hl7_now,
)
from adapter.tables.hl7v2 import Hl7v2Tables


def render_with_hl7apy(kind: str, visit: Visit, charges: list[Charge], control: str, now: datetime,
                       tables: Hl7v2Tables) -> str:
    """One DFT^P03 built as an hl7apy object tree and validated strictly: how `render` worked before it built the
    text by string formatting. Kept as the reference `render` must match byte for byte."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message
    from hl7apy.exceptions import HL7apyException

    if kind not in (CHARGE, CREDIT) or not charges:
        raise ValueError(f"a {kind} message needs charges")
    stamp = hl7_now(now)
    sign = -1 if kind == CREDIT and tables.credit_sign == "negative" else 1
    try:
        msg = Message("DFT_P03", version=tables.version, validation_level=VALIDATION_LEVEL.STRICT)
        msh = msg.msh
        msh.msh_3 = escape(tables.sending_application)
        if tables.sending_facility:
            msh.msh_4 = escape(tables.sending_facility)
        if tables.receiving_application:
            msh.msh_5 = escape(tables.receiving_application)
        if tables.receiving_facility:
            msh.msh_6 = escape(tables.receiving_facility)
        msh.msh_7 = stamp
        msh.msh_9 = "DFT^P03" if tables.version in ("2.3.1", "2.4") else "DFT^P03^DFT_P03"
        msh.msh_10 = control
        msh.msh_11 = tables.processing_id
        msh.msh_12 = tables.version
        msg.evn.evn_1 = "P03"
        msg.evn.evn_2 = stamp
        pid = msg.pid
        pid.pid_1 = "1"
        pid.pid_3 = _cx(visit.mrn, visit.mrn_authority, visit.mrn_type)
        pid.pid_5 = "^".join(escape(p) for p in (visit.family, visit.given, visit.middle)).rstrip("^")
        if visit.birth_date:
            pid.pid_7 = visit.birth_date
        if visit.sex:
            pid.pid_8 = visit.sex
        pv1 = msg.pv1
        pv1.pv1_1 = "1"
        pv1.pv1_2 = visit.patient_class
        if visit.attending:
            pv1.pv1_7 = visit.attending.xcn()
        pv1.pv1_19 = _cx(visit.visit_number, visit.visit_authority, visit.visit_type)
        diagnoses: list[Coded] = []
        for n, charge in enumerate(charges, start=1):
            ft1 = msg.add_group("DFT_P03_FINANCIAL").ft1
            ft1.ft1_1 = str(n)
            ft1.ft1_2 = escape(charge.line)
            ft1.ft1_4 = charge.service_time
            ft1.ft1_5 = stamp
            ft1.ft1_6 = kind
            ft1.ft1_7 = charge.transaction.ce()
            ft1.ft1_10 = str(sign * charge.units)
            if charge.unit_price is not None:
                unit = Decimal(charge.unit_price)
                ft1.ft1_11 = _money(sign * unit * charge.units, charge.currency)
                ft1.ft1_12 = _money(unit, charge.currency)
            for diagnosis in charge.diagnoses:  # repetitions, in pointer order
                ft1.add_field("FT1_19").value = diagnosis.ce()
            ft1.ft1_20 = charge.performer.xcn()
            if charge.ordering:
                ft1.ft1_21 = charge.ordering.xcn()
            ft1.ft1_25 = charge.code.ce()
            for modifier in charge.modifiers:
                ft1.add_field("FT1_26").value = modifier.ce()
            diagnoses += [d for d in charge.diagnoses if d not in diagnoses]
        for n, diagnosis in enumerate(diagnoses, start=1):
            dg1 = msg.add_segment("DG1")
            dg1.dg1_1 = str(n)
            dg1.dg1_3 = diagnosis.ce()
            dg1.dg1_6 = "F"
            if n == 1:
                dg1.dg1_15 = "1"  # table 0359: the primary diagnosis
        text = msg.to_er7()
        if not text.isascii():  # names with accents: say how the bytes are encoded (table 0211)
            msh.msh_18 = "UNICODE" if tables.version in ("2.3.1", "2.4") else "UNICODE UTF-8"
            text = msg.to_er7()
    except HL7apyException as exc:
        raise InvalidMessageError(f"DFT^P03 {control} cannot be built for HL7 v{tables.version}: {exc}") from None
    _strictly_valid(msg, tables.version, f"DFT^P03 {control}")  # the structure the text was written from
    return text
