"""The worklist in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright), served by a real
`charge-adapter worklist` process against HAPI: log in, filter, open an item, read its explanation, replay it
and see it leave the list; without a login the page is refused, an action without the CSRF token too.
Screenshots of the list and of an item page go to the test's folder."""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, sync_playwright

from adapter.client import FhirClient
from adapter.worklist.reasons import REASONS

from .adapter_process import ONLY_NEW, TOKEN, Adapter, billed
from .helpers import free_port, namespaced, patients_of, server_now, wait_for
from .worklist_helpers import give_scenario_80_a_payer, page_answers

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
"""Without the background-networking flags Chromium keeps trying hosts this closed network refuses."""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def adapter(tmp_path: Path, hapi_url: str) -> Iterator[Adapter]:
    runner = Adapter(tmp_path, hapi_url, worklist={"port": free_port(), "task_poll_seconds": 0}, poll=ONLY_NEW)
    yield runner
    runner.stop_all()


def test_a_coder_works_an_item_in_the_browser(client: FhirClient, adapter: Adapter, browser: Browser,
                                              fhir_ns: str, tmp_path: Path) -> None:
    adapter.start_cursor_at(server_now(client))
    bundles = {n: namespaced(n, fhir_ns) for n in ("31", "80")}  # modality-missing, missing-payer
    for bundle in bundles.values():
        client.transaction(bundle)
    assert adapter.cmd("run", "--once").returncode == 1
    payer_item = next(e for e in adapter.store().reviews() if e.reason == "missing-payer")
    adapter.start("worklist")
    base = f"http://127.0.0.1:{adapter.settings['worklist']['port']}/worklist"
    wait_for(lambda: page_answers(base), 60, "the worklist to listen")

    page = browser.new_page()
    page.goto(f"{base}/item/{payer_item.id}")
    assert page.url.endswith("/worklist/login")  # no login, no page
    page.fill("input[name=name]", "coder1")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    assert page.locator("h1").inner_text().startswith("Open review items")
    assert page.locator("table.items tbody tr").count() == 2
    page.select_option("select[name=reason]", "missing-payer")
    page.click("form.filters button[type=submit]")
    rows = page.locator("table.items tbody tr")
    assert rows.count() == 1 and "missing-payer" in rows.first.inner_text()
    page.screenshot(path=str(tmp_path / "worklist-list.png"), full_page=True)

    page.click(f"a[href$='/item/{payer_item.id}']")
    assert page.locator("dd.fix").inner_text() == REASONS["missing-payer"].fix
    assert "names no payer Organization" in page.locator("dd.detail").inner_text()
    page.screenshot(path=str(tmp_path / "worklist-item.png"), full_page=True)

    # an action without the CSRF token (the session's cookie alone) is refused
    forged = page.context.request.post(f"{base}/item/{payer_item.id}/replay", form={"go": "replay"})
    assert forged.status == 403
    assert adapter.store().review(payer_item.id).status == "open"  # type: ignore[union-attr]
    assert requests.get(f"{base}/", allow_redirects=False, timeout=10).status_code == 303  # no cookie: login

    give_scenario_80_a_payer(client, bundles["80"], fhir_ns)
    page.click("button[value=replay]")
    assert f"Item {payer_item.id} replayed: coded." in html.unescape(page.locator(".message").inner_text())
    assert page.locator(f"a[href$='/item/{payer_item.id}']").count() == 0  # it left the list
    assert page.locator("table.items tbody tr").count() == 1  # the other item is still there
    assert billed(client, patients_of(bundles["80"])) == [("10005", 1)]
    assert (tmp_path / "worklist-list.png").stat().st_size > 1000 and (tmp_path / "worklist-item.png").exists()
