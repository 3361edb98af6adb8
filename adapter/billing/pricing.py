"""Prices, a step apart from coding: a CPT line's unit price from ChargeItemDefinitions, else the chargemaster.

A ChargeItemDefinition applies to a line when it is active, names the CPT code in `code`, is effective on
the date of service, its `useContext` venue (if any) is the billing organization, and each of its
`applicability` conditions (FHIRPath, evaluated on the ChargeItem being priced, e.g. on its modifier
extension) holds. Of those, the most specific (most conditions) wins; a tie is no price, never a guess.
Its price is the sum of the price components of the property groups that apply: base amounts, plus
surcharges and taxes, minus deductions and discounts (each an amount or a factor). Pure: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from adapter.extraction.index import modifier_extensions, normalize_reference
from adapter.tables.billing import ChargemasterRow, PricingTables

USAGE_CONTEXT_TYPE = "http://terminology.hl7.org/CodeSystem/usage-context-type"
FHIRPATH = "text/fhirpath"
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Price:
    unit: Decimal
    currency: str
    source: str
    """For humans: which definition or chargemaster row, and how the amount was reached."""
    definition: str | None = None
    """Canonical (`url|version`) of the ChargeItemDefinition used, if any."""
    charge_code: str | None = None
    revenue_code: str | None = None


@dataclass(frozen=True)
class NoPrice:
    detail: str
    reason: str = "missing-price"
    """`unknown-modifier-extension` when a definition in scope for the line carries a modifierExtension the
    adapter does not know: no price can be chosen (the session is held), which is not a missing price."""


class UnusableDefinition(ValueError):
    """A ChargeItemDefinition that cannot be evaluated (unknown language, broken FHIRPath, no base price)."""


@lru_cache(maxsize=256)
def _compiled(expression: str) -> Any:
    import fhirpathpy
    from fhirpathpy.models import models

    return fhirpathpy.compile(expression, models["r4"])


def _holds(conditions: list[Any], charge_item: dict[str, Any], where: str) -> bool:
    for i, cond in enumerate(conditions):
        if not isinstance(cond, dict):
            raise UnusableDefinition(f"{where}applicability[{i}] is not an object")
        language, expression = cond.get("language"), cond.get("expression")
        if language != FHIRPATH or not isinstance(expression, str) or not expression.strip():
            raise UnusableDefinition(f"{where}applicability[{i}] needs language {FHIRPATH} and an expression "
                                     f"(got {language!r})")
        try:
            result = _compiled(expression)(charge_item, {})
        except Exception as exc:  # fhirpathpy raises many kinds for a bad expression
            raise UnusableDefinition(f"{where}applicability[{i}] {expression!r} cannot be evaluated: {exc}") from None
        if result != [True]:
            return False
    return True


def _venues(definition: dict[str, Any]) -> list[Any]:
    """The billing organizations a definition is limited to (its `venue` useContexts)."""
    return [uc.get("valueReference") or {} for uc in definition.get("useContext") or []
            if isinstance(uc, dict) and (uc.get("code") or {}).get("code") == "venue"]


def _day(text: Any) -> date | None:
    try:
        return date.fromisoformat(str(text)[:10]) if text else None
    except ValueError:
        return None


def _literal(value: Any) -> str | None:
    reference = value.get("reference") if isinstance(value, dict) else None
    return normalize_reference(reference) if isinstance(reference, str) else None


def canonical_of(definition: dict[str, Any]) -> str:
    url = str(definition.get("url", ""))
    return f"{url}|{definition['version']}" if definition.get("version") else url


class PriceBook:
    """Every ChargeItemDefinition at hand (server/input and config files) by CPT code, plus the chargemaster."""

    def __init__(self, definitions: list[tuple[str, dict[str, Any]]], pricing: PricingTables, cpt_system: str,
                 key_of: Callable[[Any, dict[str, Any]], str | None] | None = None,
                 known_modifiers: frozenset[str] = frozenset()) -> None:
        self.pricing = pricing
        self.known_modifiers = known_modifiers
        self._unknown: dict[str, list[str]] = {}
        self.key_of = key_of or (lambda value, _definition: _literal(value))
        """The canonical key of a Reference written in a definition (the input may use any reference form)."""
        self.by_code: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for origin, definition in definitions:
            if definition.get("status") != "active":
                continue
            for coding in (definition.get("code") or {}).get("coding") or []:
                if isinstance(coding, dict) and coding.get("system") == cpt_system and coding.get("code"):
                    self.by_code[str(coding["code"])].append((origin, definition))
        self.rows: dict[str, list[ChargemasterRow]] = defaultdict(list)
        for row in pricing.chargemaster:
            self.rows[row.cpt].append(row)

    def _unknown_modifiers(self, origin: str, definition: dict[str, Any]) -> list[str]:
        key = f"{origin}|{canonical_of(definition)}|{id(definition)}"
        if key not in self._unknown:
            self._unknown[key] = modifier_extensions(definition, "ChargeItemDefinition", self.known_modifiers)
        return self._unknown[key]

    def _in_scope(self, definition: dict[str, Any], day: date, billing_org: str | None) -> bool:
        """Whether the definition is for this date of service and billing organization (its applicability
        conditions aside): what makes an unknown modifierExtension on it matter for the line."""
        period = definition.get("effectivePeriod") or {}
        start, end = _day(period.get("start")), _day(period.get("end"))
        if (start and day < start) or (end and day > end):
            return False
        venues = _venues(definition)
        return not venues or any(self.key_of(v, definition) == billing_org for v in venues if isinstance(v, dict))

    def price(self, code: str, modifiers: tuple[str, ...], day: date, charge_item: dict[str, Any],
              billing_org: str | None) -> Price | NoPrice:
        """The unit price of one line; `charge_item` is the ChargeItem as built (FHIRPath sees it)."""
        candidates: list[tuple[int, str, dict[str, Any]]] = []
        unusable: list[str] = []
        not_understood = [f"ChargeItemDefinition {canonical_of(d) or origin} ({origin}): {found}"
                          for origin, d in self.by_code.get(code, []) if self._in_scope(d, day, billing_org)
                          for found in self._unknown_modifiers(origin, d)]
        if not_understood:
            return NoPrice(f"{'; '.join(not_understood)}: not understood, and FHIR forbids pricing {code} as if "
                           "that definition did not exist", "unknown-modifier-extension")
        for origin, definition in self.by_code.get(code, []):
            try:
                weight = self._applies(definition, day, charge_item, billing_org)
            except UnusableDefinition as exc:
                unusable.append(f"{canonical_of(definition) or origin}: {exc}")
                continue
            if weight is not None:
                candidates.append((weight, origin, definition))
        if candidates:
            best = max(w for w, _, _ in candidates)
            top = [(o, d) for w, o, d in candidates if w == best]
            if len({canonical_of(d) for _, d in top}) > 1:
                return NoPrice(f"{len(top)} ChargeItemDefinitions apply equally to {code} on {day}: "
                               f"{', '.join(sorted(canonical_of(d) for _, d in top))}")
            try:
                return self._from_definition(top[0][1], charge_item)
            except UnusableDefinition as exc:
                unusable.append(f"{canonical_of(top[0][1])}: {exc}")
        row = self._row(code, modifiers, day)
        if row is not None:
            label = "-".join((code, *modifiers))
            revenue = f", revenue code {row.revenue_code}" if row.revenue_code else ""
            return Price(row.unit_price, self.pricing.currency,
                         f"chargemaster {row.charge_code} {row.description}{revenue} ({label}): "
                         f"{row.unit_price} {self.pricing.currency}", None, row.charge_code, row.revenue_code)
        said = f"; unusable: {'; '.join(unusable)}" if unusable else ""
        return NoPrice(f"no ChargeItemDefinition applies and {self.pricing.chargemaster_file} has no row for "
                       f"{'-'.join((code, *modifiers))} on {day}{said}")

    def _row(self, code: str, modifiers: tuple[str, ...], day: date) -> ChargemasterRow | None:
        return chargemaster_row(self.rows.get(code, []), code, modifiers, day)

    def _applies(self, definition: dict[str, Any], day: date, charge_item: dict[str, Any],
                 billing_org: str | None) -> int | None:
        """None when it does not apply; else its specificity (number of conditions met)."""
        if not self._in_scope(definition, day, billing_org):
            return None
        conditions = definition.get("applicability") or []
        if not _holds(conditions, charge_item, ""):
            return None
        return len(conditions) + (1 if _venues(definition) else 0)

    def _from_definition(self, definition: dict[str, Any], charge_item: dict[str, Any]) -> Price:
        bases: list[Decimal] = []
        adjustments: list[tuple[str, Decimal | None, Decimal | None]] = []
        currencies: set[str] = set()
        for g, group in enumerate(definition.get("propertyGroup") or []):
            if not _holds(group.get("applicability") or [], charge_item, f"propertyGroup[{g}]."):
                continue
            for c, comp in enumerate(group.get("priceComponent") or []):
                kind = comp.get("type")
                amount, factor = _money(comp.get("amount"), currencies), _decimal(comp.get("factor"))
                where = f"propertyGroup[{g}].priceComponent[{c}]"
                if kind == "base":
                    if amount is None:
                        raise UnusableDefinition(f"{where}: a base component needs an amount")
                    bases.append(amount)
                elif kind in ("surcharge", "deduction", "discount", "tax"):
                    if amount is None and factor is None:
                        raise UnusableDefinition(f"{where}: {kind} needs an amount or a factor")
                    adjustments.append((kind, amount, factor))
                elif kind != "informational":
                    raise UnusableDefinition(f"{where}: unknown price component type {kind!r}")
        if not bases:
            raise UnusableDefinition("no base price component applies")
        if len(currencies) > 1:
            raise UnusableDefinition(f"amounts in several currencies ({', '.join(sorted(currencies))})")
        base = sum(bases, Decimal(0))
        total, steps = base, [f"base {base.quantize(CENT)}"]
        # surcharges, deductions and discounts are relative to the base; taxes to the subtotal after them
        for kind, amount, factor in sorted(adjustments, key=lambda a: a[0] == "tax"):
            value = amount if amount is not None else (factor or Decimal(0)) * (total if kind == "tax" else base)
            sign = -1 if kind in ("deduction", "discount") else 1
            total += sign * value
            steps.append(f"{'+' if sign > 0 else '-'} {kind} {value.quantize(CENT)}")
        currency = next(iter(currencies), self.pricing.currency)
        unit = total.quantize(CENT)
        if unit < 0:
            raise UnusableDefinition(f"the price components add up to {unit}")
        canonical = canonical_of(definition)
        return Price(unit, currency, f"ChargeItemDefinition {canonical}: {' '.join(steps)} = {unit} {currency}",
                     canonical)


def chargemaster_row(rows: Iterable[ChargemasterRow], code: str, modifiers: tuple[str, ...],
                     day: date) -> ChargemasterRow | None:
    """The chargemaster row of a line on `day`: one naming exactly its modifiers wins over one for any."""
    found = [r for r in rows if r.applies(code, modifiers, day)]
    exact = [r for r in found if r.modifiers is not None]
    return (exact or found or [None])[0]


def _decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise UnusableDefinition(f"{value!r} is not a number") from None


def _money(value: Any, currencies: set[str]) -> Decimal | None:
    if not isinstance(value, dict) or value.get("value") is None:
        return None
    if value.get("currency"):
        currencies.add(str(value["currency"]))
    return _decimal(value["value"])
