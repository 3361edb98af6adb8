"""Issue 18 rules, table-driven and over all inputs: FNAs included in an endoscopic code (included-fna), table rows
chosen by the date of service (effective-dates) with the MUE adjudication indicator and the CMS import, and the
facility's time zone for times written in UTC (date-of-service)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.cli import cli
from adapter.config import DEFAULT_CONFIG_DIR, MueLimit, load_tables
from adapter.dated import Effective, Rows
from adapter.errors import ConfigError
from adapter.extraction import timezones
from adapter.mue_import import parse_cms_mue, quarter_dates

from .test_engine_rules import CPT, TABLES, coverage, lines, procedure, reviews, run

EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INCLUDING = sorted(TABLES.including)
TZ = "http://hl7.org/fhir/StructureDefinition/timezone"


def including(pid: str, key: tuple[str, str], **extra: Any) -> dict[str, Any]:
    """An endoscopic Procedure coded `key`, no guidance of its own, same patient, provider and encounter."""
    return procedure(pid, None, code=key, **extra)


# ------------------------------------------------------------------------------------------------ included-fna
@EXAMPLES
@given(key=st.sampled_from(INCLUDING), how=st.sampled_from(["partOf", "sibling", "own-code"]),
       lesion=st.sampled_from(["bs1", None]), extra=st.integers(0, 2))
def test_an_included_fna_never_bills_and_names_the_including_code(key: tuple[str, str], how: str,
                                                                  lesion: str | None, extra: int) -> None:
    """Whatever including code, however it is related and whatever the lesions: the FNA bills nothing, the
    explanation names the code, and without the including procedure the same FNA is billed."""
    lesions = (lesion,) if lesion else ()
    fna = procedure("f1", "us", (*lesions, *(f"x{i}" for i in range(extra))), when="2026-03-04T10:00:00Z")
    others: list[dict[str, Any]] = []
    if how == "own-code":
        fna["code"]["coding"].append({"system": key[0], "code": key[1]})
    else:
        others.append(including("eus", key, lesions=lesions, when="2026-03-04T09:30:00Z"))
        if how == "partOf":
            fna["partOf"] = [{"reference": "Procedure/eus"}]
    report = run(fna, *others, coverage())
    assert lines(report) == [] and not report.reviews
    (no_charge,) = report.coding.no_charge
    assert no_charge.included_in == ("Procedure/f1" if how == "own-code" else "Procedure/eus")
    notes = [text for rule, text in no_charge.notes if rule == "included-fna"]
    assert len(notes) == 1 and key[1] in notes[0] and "not ours to bill" in notes[0]
    alone = run(procedure("f1", "us", (*lesions, *(f"x{i}" for i in range(extra)))), coverage())
    assert [ln[0] for ln in lines(alone)][:1] == ["10005"]


def test_a_same_session_including_procedure_of_another_provider_date_or_encounter_includes_nothing() -> None:
    eus = (CPT, "43238")
    for change in ({"performer": "d2"}, {"when": "2026-03-05T09:00:00Z"}, {"encounter": "e2"}, {"status": "not-done"}):
        report = run(procedure("f1", "us"), including("eus", eus, **change), coverage())
        assert lines(report) == [("10005", (), 1, ("f1",))], change
    partof_not_done = run(procedure("f1", "us", partOf=[{"reference": "Procedure/eus"}]),
                          including("eus", eus, status="not-done"), coverage())
    assert lines(partof_not_done) == [("10005", (), 1, ("f1",))]


def test_a_same_session_including_procedure_on_another_body_structure_is_reviewed() -> None:
    report = run(procedure("f1", "ct", ("liver",)), including("eus", (CPT, "43242"), lesions=("pancreas",)),
                 coverage())
    assert reviews(report) == {("f1", "included-fna-distinct-site")} and lines(report) == []
    assert any(r.procedure == "Procedure/f1" and "43242" in r.detail for r in report.reviews)


def test_an_including_code_outside_its_dates_is_reviewed_not_guessed() -> None:
    # 31652 exists from 2016-01-01 (config/including-procedures.yaml)
    report = run(procedure("f1", "us", when="2015-06-01T09:00:00Z", partOf=[{"reference": "Procedure/ebus"}]),
                 including("ebus", (CPT, "31652"), when="2015-06-01T08:30:00Z"), coverage())
    assert reviews(report) == {("f1", "no-row-for-date")}
    assert "2016-01-01" in report.reviews[0].detail


# ---------------------------------------------------------------------------------------------- effective-dates
def test_the_date_of_service_chooses_the_family_row_and_before_2019_there_is_none() -> None:
    assert lines(run(procedure("f1", "us", when="2019-01-01T09:00:00Z"), coverage())) == [("10005", (), 1, ("f1",))]
    before = run(procedure("f1", "us", when="2018-12-31T09:00:00Z"), coverage())
    assert reviews(before) == {("f1", "no-row-for-date")} and "2019-01-01" in before.reviews[0].detail


def test_modality_rows_by_date(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, folder)
    path = folder / "modalities.yaml"
    text = path.read_text().replace(
        '- {system: "http://dicom.nema.org/resources/ontology/DCM", code: "CT", modality: ct, display: "Computed '
        'Tomography"}  # DICOM modality',
        '- {system: "http://dicom.nema.org/resources/ontology/DCM", code: "CT", modality: ct, effective: {end: '
        '2025-12-31}}\n  - {system: "http://dicom.nema.org/resources/ontology/DCM", code: "CT", modality: mr, '
        'effective: {start: 2026-01-01, end: 2026-02-28}}')
    path.write_text(text)
    tables = load_tables(folder)
    assert lines(run(procedure("f1", "ct", when="2025-06-01T09:00:00Z"), tables=tables))[0][0] == "10009"
    assert lines(run(procedure("f1", "ct", when="2026-02-01T09:00:00Z"), tables=tables))[0][0] == "10011"
    late = run(procedure("f1", "ct", when="2026-03-04T09:00:00Z"), tables=tables)
    assert reviews(late) == {("f1", "no-row-for-date")} and "modalities.yaml" in late.reviews[0].detail
    path.write_text(text.replace("effective: {start: 2026-01-01, end: 2026-02-28}", "effective: {start: 2025-12-01}"))
    with pytest.raises(ConfigError, match=r"modalities.yaml: method_codes\[\d+\]: .*overlaps method_codes"):
        load_tables(folder)


@pytest.mark.parametrize(("a", "b", "day", "covered"), [
    (None, None, "2001-01-01", True), ("2019-01-01", None, "2018-12-31", False),
    ("2019-01-01", None, "2019-01-01", True),
    (None, "2026-03-31", "2026-03-31", True), (None, "2026-03-31", "2026-04-01", False),
    ("2026-04-01", "2026-06-30", "2026-05-15", True)])
def test_effective_bounds_are_inclusive(a: str | None, b: str | None, day: str, covered: bool) -> None:
    effective = Effective(date.fromisoformat(a) if a else None, date.fromisoformat(b) if b else None)
    assert effective.covers(day) is covered


def mue_tables(code: str, *rows: tuple[int, int | None, str | None, str | None]) -> Any:
    table = dict(TABLES.mue)
    table[code] = Rows(tuple((Effective(date.fromisoformat(s) if s else None, date.fromisoformat(e) if e else None),
                              MueLimit(units, "CMS test", mai)) for units, mai, s, e in rows))
    return dataclasses.replace(TABLES, mue=table)


def two_sessions_one_day() -> list[dict[str, Any]]:
    return [procedure("f1", "us", ("a",), encounter="e1", when="2026-05-04T09:00:00Z"),
            procedure("f2", "us", ("b",), encounter="e2", when="2026-05-04T15:00:00Z"), coverage()]


@pytest.mark.parametrize(("mai", "held", "said"), [
    (1, False, ""), (2, True, "MAI 2, a date-of-service edit by policy"),
    (3, True, "MAI 3, a date-of-service edit on clinical grounds"), (None, True, "no adjudication indicator")])
def test_the_adjudication_indicator_decides_what_is_added_up(mai: int | None, held: bool, said: str) -> None:
    """10005 x1 in each of two encounters of one day: a line edit (MAI 1) passes each line, a date-of-service
    edit (MAI 2, 3, or none given) adds the day up and holds both sessions."""
    report = run(*two_sessions_one_day(), tables=mue_tables("10005", (1, mai, None, None)))
    if held:
        assert reviews(report) == {("f1", "mue-exceeded"), ("f2", "mue-exceeded")}
        assert said in report.reviews[0].detail
    else:
        assert lines(report) == [("10005", (), 1, ("f1",)), ("10005", (), 1, ("f2",))]


def test_a_line_edit_still_holds_a_line_over_its_limit() -> None:
    report = run(procedure("f1", "us", ("a", "b", "c")), coverage(), tables=mue_tables("10006", (1, 1, None, None)))
    assert reviews(report) == {("f1", "mue-exceeded")} and "MAI 1" in report.reviews[0].detail


def test_the_mue_row_of_the_date_of_service_applies_and_a_gap_is_reviewed() -> None:
    tables = mue_tables("10005", (1, 2, None, "2026-03-31"), (2, 2, "2026-04-01", "2026-06-30"))
    assert lines(run(*two_sessions_one_day(), tables=tables))[0][0] == "10005"  # May: the second row's 2 units
    march = [dict(r, performedDateTime=r["performedDateTime"].replace("05-04", "03-04")) if "performedDateTime" in r
             else r for r in two_sessions_one_day()]
    assert reviews(run(*march, tables=tables)) == {("f1", "mue-exceeded"), ("f2", "mue-exceeded")}
    july = run(procedure("f1", "us", when="2026-07-01T09:00:00Z"), coverage(), tables=tables)
    assert reviews(july) == {("f1", "no-row-for-date")} and "mue import" in july.reviews[0].detail


CMS_CSV = '''"CMS Practitioner Services MUE Table"
"CPT only copyright American Medical Association. All rights reserved."
""
"HCPCS/CPT Code","Practitioner Services MUE Values","MUE Adjudication Indicator","MUE Rationale"
"10005","1","2 Date of Service Edit: Policy","Code Descriptor / CPT Instruction"
"10006","2","3 Date of Service Edit: Clinical","Clinical: Data"
"99213","1","1 Line Edit","Nature of Service/Procedure"
'''


def test_the_cms_table_is_read_by_its_published_columns() -> None:
    rows = parse_cms_mue(CMS_CSV, "cms.csv")
    assert [(r.code, r.units, r.mai, r.rationale) for r in rows] == [
        ("10005", 1, 2, "Code Descriptor / CPT Instruction"), ("10006", 2, 3, "Clinical: Data"),
        ("99213", 1, 1, "Nature of Service/Procedure")]
    with pytest.raises(ConfigError, match=r"cms\.csv: no header row"):
        parse_cms_mue('"code","units"\n"10005","1"\n', "cms.csv")
    with pytest.raises(ConfigError, match=r"cms.csv: line 5: 10005: MUE adjudication indicator 'x'"):
        parse_cms_mue(CMS_CSV.replace('"2 Date of Service Edit: Policy"', '"x"'), "cms.csv")
    assert quarter_dates("2026Q1") == (date(2026, 1, 1), date(2026, 3, 31))
    assert quarter_dates("2026q4") == (date(2026, 10, 1), date(2026, 12, 31))


def test_mue_import_writes_the_quarter_and_the_engine_uses_it(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, folder)
    (tmp_path / "cms.csv").write_text(CMS_CSV)
    result = CliRunner().invoke(cli, ["--tables", str(folder), "mue", "import", str(tmp_path / "cms.csv"),
                                      "--quarter", "2026Q2"])
    assert result.exit_code == 0, result.output
    assert "2 code(s) imported for 2026Q2 (2026-04-01 to 2026-06-30)" in result.stdout
    assert "10021" in result.stderr  # the family's codes the file does not have are named
    text = (folder / "mue.yaml").read_text()
    assert text.startswith("# Medically Unlikely Edits") and "99213" not in text
    tables = load_tables(folder)
    assert tables.mue["10006"].on("2026-05-01") == MueLimit(2, "CMS practitioner services MUE table 2026Q2 (cms.csv)",
                                                            3, "Clinical: Data")
    assert tables.mue["10006"].on("2026-03-31").units == 3  # the site decision, ended the day before
    assert tables.mue["10006"].on("2026-07-01") is None  # next quarter: import it, or review
    again = CliRunner().invoke(cli, ["--tables", str(folder), "mue", "import", str(tmp_path / "cms.csv"),
                                     "--quarter", "2026Q2"])
    assert again.exit_code == 0 and (folder / "mue.yaml").read_text() == text  # idempotent


# ------------------------------------------------------------------------------------------- date-of-service
def location(lid: str, zone: str | None) -> dict[str, Any]:
    return {"resourceType": "Location", "id": lid, **({"extension": [{"url": TZ, "valueCode": zone}]} if zone else {})}


def encounter(eid: str = "e1", locations: tuple[str, ...] = (), provider: str | None = None) -> dict[str, Any]:
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": eid, "status": "finished",
                           "class": {"code": "AMB"}, "subject": {"reference": "Patient/p1"}}
    if locations:
        enc["location"] = [{"location": {"reference": f"Location/{lid}"}} for lid in locations]
    if provider:
        enc["serviceProvider"] = {"reference": f"Organization/{provider}"}
    return enc


def organization(oid: str, zone: str | None) -> dict[str, Any]:
    ext = {"extension": [{"url": TZ, "valueCode": zone}]} if zone else {}
    return {"resourceType": "Organization", "id": oid, **ext}


LATE_UTC = "2026-06-04T03:30:00Z"
"""22:30 on 3 June in Chicago, 20:30 in Los Angeles; 4 June in UTC and in Berlin."""


@pytest.mark.parametrize(("resources", "extra", "day"), [
    ([encounter()], {}, "2026-06-04"),
    ([encounter(locations=("l1",)), location("l1", "America/Chicago")], {}, "2026-06-03"),
    ([encounter(locations=("l1",), provider="o1"), location("l1", None), organization("o1", "America/Los_Angeles")],
     {}, "2026-06-03"),  # a Location without the extension: on to the Organization
    ([encounter(provider="o1"), organization("o1", "America/Los_Angeles")], {}, "2026-06-03"),
    ([encounter(locations=("l1",), provider="o1"), location("l1", "Europe/Berlin"),
      organization("o1", "America/Chicago")], {}, "2026-06-04"),  # the Location before the Organization
    ([encounter(provider="o1"), organization("o1", "America/Chicago"), location("l9", "Europe/Berlin")],
     {"location": {"reference": "Location/l9"}}, "2026-06-04"),  # the Procedure's own location first
])
def test_the_facility_zone_dates_a_utc_time_in_its_order(resources: list[dict[str, Any]], extra: dict[str, Any],
                                                         day: str) -> None:
    report = run(procedure("f1", "us", when=LATE_UTC, **extra), *resources, coverage())
    (facts,) = report.facts
    assert facts.service_date == day, facts.notes


def test_on_behalf_of_organization_zone_and_offsets_are_kept() -> None:
    behalf = procedure("f1", "us", when=LATE_UTC)
    behalf["performer"][0]["onBehalfOf"] = {"reference": "Organization/o1"}
    report = run(behalf, encounter(), organization("o1", "America/Chicago"), coverage())
    assert report.facts[0].service_date == "2026-06-03" and report.facts[0].time_basis == "utc-facility"
    offset = run(procedure("f1", "us", when="2026-06-04T03:30:00+02:00"), encounter(locations=("l1",)),
                 location("l1", "America/Chicago"), coverage())
    assert offset.facts[0].service_date == "2026-06-04" and offset.facts[0].time_basis == "offset"


def test_conflicting_and_invalid_zones_are_reviewed() -> None:
    two = run(procedure("f1", "us", when=LATE_UTC), encounter(locations=("l1", "l2")),
              location("l1", "America/Chicago"), location("l2", "Europe/Berlin"), coverage())
    assert reviews(two) == {("f1", "time-zone-conflict")}
    same_day = run(procedure("f1", "us", when=LATE_UTC), encounter(locations=("l1", "l2")),
                   location("l1", "America/Chicago"), location("l2", "America/Denver"), coverage())
    assert not same_day.reviews and same_day.facts[0].service_date == "2026-06-03"
    bad = run(procedure("f1", "us", when=LATE_UTC), encounter(locations=("l1",)), location("l1", "Mars/Olympus"),
              coverage())
    assert reviews(bad) == {("f1", "invalid-resource")} and "Mars/Olympus" in bad.reviews[0].detail


def test_an_all_utc_feed_with_the_default_zone_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    from adapter.report import diagnostics

    utc = run(procedure("f1", "us"), coverage())
    assert diagnostics(utc)[-1].startswith("warning: every performed time in this input is written in UTC")
    mixed = run(procedure("f1", "us"), procedure("f2", "us", ("b",), when="2026-03-04T10:00:00-06:00"), coverage())
    assert not any("written in UTC (Z)" in line for line in diagnostics(mixed))
    zoned = run(procedure("f1", "us"), coverage(), tables=dataclasses.replace(
        TABLES, settings=dataclasses.replace(TABLES.settings, time_zone="America/Chicago")))
    assert not any("written in UTC (Z)" in line for line in diagnostics(zoned))
    timezones._warned.clear()
    log = logging.getLogger("test.utc")
    with caplog.at_level("WARNING", logger="test.utc"):
        timezones.warn_utc_feed_once(utc.facts, log)
        timezones.warn_utc_feed_once(utc.facts, log)
    assert [r.getMessage()[:37] for r in caplog.records] == ["every performed time in this input is"]


@pytest.mark.parametrize(("file", "old", "new", "message"), [
    ("mue.yaml", '"10004": {units: 3,', '"10004": {units: 3, mai: 4,', r"mue.yaml: limits.10004.mai: must be 1"),
    ("mue.yaml", '"10004": {units: 3,', '"10004": {units: 3, effective: {start: 2026-05-01, end: 2026-04-01},',
     r"mue.yaml: limits.10004.effective: ends before it starts"),
    ("cpt-fna.yaml", "effective: {start: 2019-01-01}}\n  ultrasound:",
     "effective: {start: 2019-01-01}}\n  ultrasound: []\n  ignored:", r"cpt-fna.yaml: family.ultrasound: must have"),
    ("including-procedures.yaml", 'code: "43232", display:', 'code: "43238", display:',
     r"including-procedures.yaml: codes\[2\]: .*43238 overlaps codes\[0\]"),
    ("including-procedures.yaml", "effective: {start: 2016-01-01}}\n  - {system: \"http://www.ama-assn.org/go/cpt\", "
     "code: \"31653\"", "effective: {begin: 2016-01-01}}\n  - {system: \"http://www.ama-assn.org/go/cpt\", "
     "code: \"31653\"", r"including-procedures.yaml: codes\[5\].effective: must be a mapping with start"),
])
def test_dated_table_errors_name_the_file_and_the_row(tmp_path: Path, file: str, old: str, new: str,
                                                      message: str) -> None:
    folder = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, folder)
    text = (folder / file).read_text()
    assert old in text
    (folder / file).write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_tables(folder)


def test_family_rows_may_change_codes_by_date(tmp_path: Path) -> None:
    folder = tmp_path / "config"
    shutil.copytree(DEFAULT_CONFIG_DIR, folder)
    path = folder / "cpt-fna.yaml"
    text = path.read_text()
    start = text.index("  none:")
    end = text.index("  ultrasound:")
    rows = ('  none:\n    - {primary: "10021", add_on: "10004", effective: {start: 2019-01-01, end: 2026-06-30}}\n'
            '    - {primary: "10021", add_on: "10004", primary_display: "renamed", effective: {start: 2026-07-01}}\n')
    path.write_text(text[:start] + rows + text[end:])
    tables = load_tables(folder)
    assert tables.family["none"].on("2026-07-01").primary_display == "renamed"
    assert tables.family["none"].on("2026-06-30").primary_display == "10021"
