"""`dry-run --format x12`: the 837P interchange of a coded run's Claims (control number 1, nothing recorded)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from adapter.building.claim837 import Control, Interchange, build_interchange
from adapter.config import CodeTables


def run_claims(report: Any) -> list[dict[str, Any]]:
    """The Claims of a RunReport, in the order the JSON output has them."""
    return [r for s in report.built.sessions for r in s.resources() if r.get("resourceType") == "Claim"]


def dry_run_interchange(report: Any, tables: CodeTables, now: datetime) -> Interchange:
    return build_interchange(run_claims(report), report.index.get, tables.x12, Control(1, now))
