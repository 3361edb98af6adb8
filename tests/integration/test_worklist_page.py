"""The worklist page served by a real `charge-adapter worklist` process over HTTP, against a real HAPI server:
login, filters, an item's explanation, replay and dismiss-with-note, refusals without login or CSRF token, no
patient names, and the audit of who did what."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from adapter.client import FhirClient
from adapter.worklist.reasons import REASONS

from .adapter_process import ONLY_NEW, TABLES, TOKEN, Adapter, billed
from .helpers import free_port, namespaced, patients_of, resources_of, server_now, wait_for
from .worklist_helpers import give_scenario_80_a_payer, page_answers


@pytest.fixture
def adapter(tmp_path: Path, hapi_url: str) -> Iterator[Adapter]:
    runner = Adapter(tmp_path, hapi_url, worklist={"port": free_port(), "task_poll_seconds": 0}, poll=ONLY_NEW)
    yield runner
    runner.stop_all()


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, html
    return found.group(1)


def test_a_coder_logs_in_filters_reads_replays_and_dismisses(client: FhirClient, adapter: Adapter,
                                                             fhir_ns: str) -> None:
    adapter.start_cursor_at(server_now(client))
    bundles = {n: namespaced(n, fhir_ns) for n in ("31", "80")}  # modality-missing, missing-payer
    for bundle in bundles.values():
        client.transaction(bundle)
    assert adapter.cmd("run", "--once").returncode == 1
    entries = {e.reason: e for e in adapter.store().reviews()}
    assert set(entries) == {"modality-missing", "missing-payer"}
    names = [n.get("family") for b in bundles.values() for r in resources_of(b) if r["resourceType"] == "Patient"
             for n in r.get("name", [])]

    adapter.start("worklist")
    base = f"http://127.0.0.1:{adapter.settings['worklist']['port']}/worklist"
    wait_for(lambda: page_answers(base), 60, "the worklist to listen")
    anonymous = requests.get(f"{base}/", allow_redirects=False, timeout=10)
    assert anonymous.status_code == 303 and anonymous.headers["Location"].endswith("/worklist/login")
    assert requests.post(f"{base}/item/{entries['missing-payer'].id}/replay", data={"csrf": "x"},
                         timeout=10).status_code == 401
    assert requests.get(f"{base}/item/{entries['missing-payer'].id}", allow_redirects=False,
                        timeout=10).status_code == 303

    coder = requests.Session()
    refused = coder.post(f"{base}/login", data={"name": "coder1", "token": "wrong"}, timeout=10)
    assert refused.status_code == 401 and "not accepted" in refused.text
    page = coder.post(f"{base}/login", data={"name": "coder1", "token": TOKEN}, timeout=10)
    assert page.status_code == 200 and "Open review items" in page.text and "signed in as coder1" in page.text
    assert page.text.index(f"#{entries['modality-missing'].id}<") < page.text.index(
        f"#{entries['missing-payer'].id}<")  # oldest first (31 was recorded first) -- both listed
    assert REASONS["missing-payer"].fix in html.unescape(page.text)
    assert not any(name and name in page.text for name in names)  # no patient names unless configured

    by_reason = coder.get(f"{base}/", params={"reason": "missing-payer"}, timeout=10).text
    assert f"#{entries['missing-payer'].id}<" in by_reason and f"#{entries['modality-missing'].id}<" not in by_reason
    performer = f"Practitioner/{fhir_ns}-s80-prac"
    by_provider = coder.get(f"{base}/", params={"provider": performer}, timeout=10).text
    assert f"#{entries['missing-payer'].id}<" in by_provider and performer in by_provider
    assert f"#{entries['modality-missing'].id}<" not in by_provider
    assert "Nothing needs review with these filters" in coder.get(
        f"{base}/", params={"date_from": "2999-01-01"}, timeout=10).text
    assert "Nothing needs review with these filters" in coder.get(
        f"{base}/", params={"min_age_days": "30"}, timeout=10).text

    item = coder.get(f"{base}/item/{entries['missing-payer'].id}", timeout=10)
    assert item.status_code == 200
    for text in (REASONS["missing-payer"].fix, REASONS["missing-payer"].element, "names no payer Organization",
                 "version 1 at", "Lesions (each counted once, in order)", "(rule coding) 10005",
                 "Claim: waits in review"):
        assert text in html.unescape(item.text), text
    csrf = _csrf(item.text)
    shown = adapter.cmd("review", "show", str(entries["missing-payer"].id)).stdout
    assert f"fix:       {REASONS['missing-payer'].fix}" in shown and "element:   Coverage.payor" in shown

    # without (or with a wrong) CSRF token the action is refused and nothing happens
    assert coder.post(f"{base}/item/{entries['missing-payer'].id}/replay", timeout=10).status_code == 403
    assert coder.post(f"{base}/item/{entries['missing-payer'].id}/replay", data={"csrf": "0" * 64},
                      timeout=10).status_code == 403
    assert adapter.store().review(entries["missing-payer"].id).status == "open"  # type: ignore[union-attr]

    # the payer is fixed on the server; the coder replays from the page and the item leaves the list
    give_scenario_80_a_payer(client, bundles["80"], fhir_ns)
    replayed = coder.post(f"{base}/item/{entries['missing-payer'].id}/replay", data={"csrf": csrf}, timeout=120)
    assert replayed.status_code == 200 and "replayed: coded" in replayed.text
    assert f"#{entries['missing-payer'].id}<" not in replayed.text
    assert len(list(client.search_all("Claim", {"patient": patients_of(bundles["80"])[0]}))) == 1
    assert billed(client, patients_of(bundles["80"])) == [("10005", 1)]

    # dismissing needs a note; with one, the item is closed and the audit names the login
    missing = entries["modality-missing"].id
    csrf = _csrf(coder.get(f"{base}/item/{missing}", timeout=10).text)
    empty = coder.post(f"{base}/item/{missing}/dismiss", data={"csrf": csrf, "note": " "}, timeout=10)
    assert "needs a note" in empty.text
    done = coder.post(f"{base}/item/{missing}/dismiss", data={"csrf": csrf, "note": "palpation, billed by hand"},
                      timeout=10)
    assert done.status_code == 200 and f"Item {missing} dismissed." in done.text and "Nothing needs review" in done.text
    store = adapter.store()
    assert store.review(missing).status == "dismissed"  # type: ignore[union-attr]
    assert [(a.actor, a.action, a.note) for a in store.review_actions(missing)] == [
        ("web:coder1", "dismiss", "palpation, billed by hand")]
    assert [(a.actor, a.action) for a in store.review_actions(entries["missing-payer"].id)] == [
        ("web:coder1", "replay")]
    history = coder.get(f"{base}/item/{missing}", timeout=10).text
    assert "dismiss by web:coder1: palpation, billed by hand" in history and 'name="csrf"' not in history


def test_serve_serves_the_page_and_its_loop_acts_on_a_cancelled_task(client: FhirClient, tmp_path: Path,
                                                                      hapi_url: str, fhir_ns: str) -> None:
    adapter = Adapter(tmp_path, hapi_url, worklist={"task_poll_seconds": 1}, poll=ONLY_NEW)
    try:
        adapter.start_cursor_at(server_now(client))
        client.transaction(namespaced("31", fhir_ns))  # modality-missing
        assert adapter.cmd("run", "--once").returncode == 1
        [entry] = adapter.store().reviews()
        system = f"{TABLES.settings.canonical_base}/sid/review-item"
        [task] = client.search_all("Task", {"identifier": f"{system}|{adapter.store().installation_id()}-{entry.id}"})
        adapter.start("serve")
        adapter.wait_healthy()
        assert requests.get(f"{adapter.url}/worklist/login", timeout=10).status_code == 200
        assert requests.get(f"{adapter.url}/worklist/", allow_redirects=False, timeout=10).status_code == 303
        client.update({**task, "status": "cancelled"})
        wait_for(lambda: adapter.store().review(entry.id).status == "dismissed", 60,  # type: ignore[union-attr]
                 "serve's task loop to dismiss the item")
        wait_for(lambda: client.read("Task", task["id"])["businessStatus"]["coding"][0]["code"] == "dismissed", 30,
                 "the Task to say dismissed")
    finally:
        adapter.stop_all()
