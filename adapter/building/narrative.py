"""A short generated narrative (what, who, when) so people browsing the server see the charge.

Only what the resource itself holds is shown: codes, references, dates, amounts and organization names;
never a patient's name or other demographics.
"""

from __future__ import annotations

from html import escape
from typing import Any

XHTML = "http://www.w3.org/1999/xhtml"


def _div(paragraphs: list[str]) -> dict[str, str]:
    body = "".join(f"<p>{escape(p, quote=False)}</p>" for p in paragraphs if p)
    return {"status": "generated", "div": f'<div xmlns="{XHTML}">{body}</div>'}


def _money(value: Any) -> str:
    if not isinstance(value, dict) or value.get("value") is None:
        return ""
    return f"{float(value['value']):,.2f} {value.get('currency', '')}".strip()


def _ref(value: Any) -> str:
    if not isinstance(value, dict):
        return "?"
    return str(value.get("display") or value.get("reference") or (value.get("identifier") or {}).get("value", "?"))


def charge_item_text(item: dict[str, Any]) -> dict[str, str]:
    coding = item["code"]["coding"][0]
    label = item["code"].get("text", coding["code"])
    what = f"Charge {label} x{item['quantity']['value']}: {coding.get('display', '')}"
    who = f"Patient: {item['subject']['reference']}; performer: {_ref(item['performer'][0]['actor'])}"
    if item.get("context"):
        who += f"; encounter: {item['context']['reference']}"
    price = _money(item.get("priceOverride"))
    return _div([what, f"{who}.", f"Performed {item['occurrenceDateTime']}." + (f" Price {price}." if price else "")])


def claim_text(claim: dict[str, Any]) -> dict[str, str]:
    items = claim.get("item") or []
    codes = ", ".join("-".join([i["productOrService"]["coding"][0]["code"],
                                *(m["coding"][0]["code"] for m in i.get("modifier", []))]) for i in items)
    when = items[0]["servicedDate"] if items else ""
    total = _money(claim.get("total"))
    what = f"Professional claim, date of service {when}: {len(items)} line{'s' if len(items) != 1 else ''} ({codes})"
    care = claim.get("careTeam") or []
    who = [f"Patient: {claim['patient']['reference']}", f"billing provider: {_ref(claim.get('provider'))}"]
    if care:
        who.append(f"rendering: {_ref(care[0]['provider'])}")
    if claim.get("insurer"):
        who.append(f"payer: {_ref(claim['insurer'])}")
    pos = (items[0].get("locationCodeableConcept") or {}).get("coding", [{}])[0] if items else {}
    where = f"Place of service {pos.get('code')} {pos.get('display', '')}".strip() + "." if pos else ""
    diagnoses = ", ".join(d["diagnosisCodeableConcept"]["coding"][0]["code"] for d in claim.get("diagnosis") or [])
    return _div([what + (f", total {total}." if total else "."), "; ".join(who) + ".", where,
                 f"Diagnoses (ICD-10-CM): {diagnoses}." if diagnoses else ""])
