"""Every review reason the code can emit has a fix text, and the published CodeSystem holds exactly them."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from adapter.config import DEFAULT_CANONICAL_BASE
from adapter.conformance import PACKAGE_DIR
from adapter.extraction.procedures import RULE_OF_REASON
from adapter.state.base import ReviewKind
from adapter.sync import CHANGED_ON_SERVER
from adapter.worklist.reasons import REASONS, help_for, package_codesystems

ADAPTER = Path(__file__).resolve().parents[2] / "adapter"
REASON_SHAPE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")
# The calls whose first (or `reason=`) argument is a review reason.
REASON_CALLS = {"flag", "Finding", "Gap", "NoPrice", "HeldSession"}


def _emitted() -> set[str]:
    """Reason literals in the adapter's source: flag/Finding/Gap/HeldSession("x", ...), Review(p, o, "x", d),
    NoPrice(..., reason="x"), `review_reason`/`reason` defaults and the HL7 v2 gaps' ("hl7v2-x", detail) pairs."""
    found: set[str] = set()
    for path in ADAPTER.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                args = list(node.args)
                if name in REASON_CALLS and args and isinstance(args[0], ast.Constant):
                    found.add(str(args[0].value))
                if name == "Review" and len(args) > 2 and isinstance(args[2], ast.Constant):
                    found.add(str(args[2].value))
                for kw in node.keywords:
                    if kw.arg in ("reason", "review_reason") and isinstance(kw.value, ast.Constant):
                        found.add(str(kw.value.value))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id in ("reason", "review_reason") and isinstance(node.value, ast.Constant):
                found.add(str(node.value.value))
            elif isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[0], ast.Constant) \
                    and str(node.elts[0].value).startswith("hl7v2-"):
                found.add(str(node.elts[0].value))
    sink = (ADAPTER / "hl7v2" / "sink.py").read_text(encoding="utf-8")  # UNREACHABLE, REJECTED, DEFERRED = ...
    found |= set(re.findall(r'"(hl7v2-(?:unreachable|rejected|deferred))"', sink))
    return {r for r in found if isinstance(r, str) and REASON_SHAPE.match(r)}


def test_the_scan_finds_reasons_of_every_kind() -> None:
    emitted = _emitted()
    for expected in ("modality-missing", "missing-payer", "missing-price", "hl7v2-missing-mrn", "hl7v2-rejected",
                     "invalid-output", "session-held", "write-rejected", "unknown-modifier-extension"):
        assert expected in emitted


def test_every_emitted_reason_says_what_would_fix_it() -> None:
    reasons = _emitted() | set(RULE_OF_REASON) | {str(k) for k in ReviewKind} | {CHANGED_ON_SERVER}
    reasons.discard("needs-review")  # a kind, never a reason: needs-review entries carry the finding's reason
    missing = sorted(r for r in reasons if r not in REASONS)
    assert not missing, f"review reasons without a fix text in adapter/worklist/reasons.py: {missing}"
    for name, row in REASONS.items():
        assert row.display and row.element and row.fix.endswith("."), name


def test_an_unknown_reason_still_gets_a_generic_fix() -> None:
    assert help_for("from-a-future-version").fix.startswith("Read the detail")
    assert help_for("modality-conflict") is REASONS["modality-conflict"]


def test_the_package_holds_the_worklist_codesystems_as_the_table_makes_them() -> None:
    meta = json.loads((PACKAGE_DIR / "package.json").read_text(encoding="utf-8"))
    made = package_codesystems(DEFAULT_CANONICAL_BASE, meta["version"], "2026-12-04")
    for name, resource in made.items():
        assert json.loads((PACKAGE_DIR / name).read_text(encoding="utf-8")) == resource, name
    reasons = made["CodeSystem-review-reason.json"]
    assert [c["code"] for c in reasons["concept"]] == list(REASONS)  # type: ignore[index]
