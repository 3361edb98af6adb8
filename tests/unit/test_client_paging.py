"""Search paging: next links are followed verbatim, but only on the configured server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from adapter.client import FhirClient, FhirError, UnsafeLinkError

from .fault_server import FaultServer, Reply, Seen


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as s:
        yield s


def page(entries: list[tuple[str, str]], next_url: str | None = None, self_url: str = "") -> dict[str, Any]:
    links = [{"relation": "self", "url": self_url or "http://ignored/fhir/Procedure"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [
            {"fullUrl": f"x/{rid}", "resource": {"resourceType": rtype, "id": rid}, "search": {"mode": mode}}
            for rtype, rid, mode in ((e[0].split("/")[0], e[0].split("/")[1], e[1]) for e in entries)
        ],
    }


def hapi_next(server: FaultServer, offset: int) -> str:
    return f"{server.url}?_getpages=0f3c&_getpagesoffset={offset}&_count=2&_bundletype=searchset"


def test_follows_next_links_verbatim(server: FaultServer) -> None:
    first = page([("Procedure/1", "match"), ("Patient/p", "include")], hapi_next(server, 2))
    second = page([("Procedure/2", "match"), ("Procedure/3", "match")], hapi_next(server, 4))
    third = page([("Procedure/4", "match")])

    def getpages(request: Seen) -> Reply:
        offset = request.query["_getpagesoffset"][0]
        return Reply(200, second if offset == "2" else third)

    server.on("GET", "/fhir/Procedure", Reply(200, first))
    server.on("GET", "/fhir", getpages)
    client = FhirClient(server.url)

    pages = list(client.search("Procedure", {"code": "10021", "_count": 2, "_include": "Procedure:subject"}))
    assert len(pages) == 3
    first_request, *page_requests = server.seen()
    assert first_request.query == {"code": ["10021"], "_count": ["2"], "_include": ["Procedure:subject"]}
    assert [r.target for r in page_requests] == [
        "/fhir?_getpages=0f3c&_getpagesoffset=2&_count=2&_bundletype=searchset",
        "/fhir?_getpages=0f3c&_getpagesoffset=4&_count=2&_bundletype=searchset",
    ]
    assert client.request_count == 3


def test_search_all_yields_resources_and_modes(server: FaultServer) -> None:
    server.on(
        "GET",
        "/fhir/Procedure",
        Reply(200, page([("Procedure/1", "match"), ("Patient/p", "include")], hapi_next(server, 2))),
    )
    server.on("GET", "/fhir", Reply(200, page([("Procedure/2", "match")])))
    client = FhirClient(server.url)
    assert [r["id"] for r in client.search_all("Procedure", {"_count": 2})] == ["1", "p", "2"]
    with_mode = [(r["id"], mode) for r, mode in client.search_all_with_mode("Procedure")]
    assert with_mode == [("1", "match"), ("p", "include"), ("2", "match")]


def test_repeated_params_are_sent(server: FaultServer) -> None:
    server.on("GET", "/fhir/Procedure", Reply(200, page([])))
    client = FhirClient(server.url)
    list(client.search("Procedure", [("_lastUpdated", "ge2026-01-01"), ("_lastUpdated", "lt2026-02-01")]))
    list(client.search("Procedure", {"_lastUpdated": ["ge2026-01-01", "lt2026-02-01"]}))
    for seen in server.seen():
        assert seen.query["_lastUpdated"] == ["ge2026-01-01", "lt2026-02-01"]


@pytest.mark.parametrize(
    "next_url",
    [
        "http://evil.example/fhir?_getpages=1",
        "https://127.0.0.1:{port}/fhir?_getpages=1",  # scheme differs
        "http://127.0.0.1:{other}/fhir?_getpages=1",  # port differs
        "http://127.0.0.1:{port}/other?_getpages=1",  # outside the base path
        "http://127.0.0.1:{port}/fhirx?_getpages=1",  # prefix but not a path segment
    ],
)
def test_refuses_off_server_next_link(server: FaultServer, next_url: str) -> None:
    url = next_url.format(port=server.port, other=server.port + 1)
    server.on("GET", "/fhir/Procedure", Reply(200, page([("Procedure/1", "match")], url)))
    client = FhirClient(server.url, auth=None)
    pages = client.search("Procedure")
    assert next(pages)["entry"][0]["resource"]["id"] == "1"
    with pytest.raises(UnsafeLinkError) as caught:
        next(pages)
    assert "_getpages" not in str(caught.value)
    assert client.request_count == 1


def test_relative_next_link_resolved_against_base(server: FaultServer) -> None:
    server.on(
        "GET",
        "/fhir/Procedure",
        Reply(200, page([("Procedure/1", "match")], "Procedure?page=2")),
        Reply(200, page([("Procedure/2", "match")])),
    )
    ids = [r["id"] for r in FhirClient(server.url).search_all("Procedure")]
    assert ids == ["1", "2"]
    assert server.seen()[1].target == "/fhir/Procedure?page=2"


def test_repeated_next_link_stops_instead_of_looping(server: FaultServer) -> None:
    loop = hapi_next(server, 2)
    server.on("GET", "/fhir/Procedure", Reply(200, page([], loop)))
    server.on("GET", "/fhir", Reply(200, page([], loop)))
    with pytest.raises(FhirError, match="repeated a next link"):
        list(FhirClient(server.url).search("Procedure"))


def test_non_bundle_search_result_is_an_error(server: FaultServer) -> None:
    server.on("GET", "/fhir/Procedure", Reply(200, {"resourceType": "OperationOutcome"}))
    with pytest.raises(FhirError, match="not a Bundle"):
        list(FhirClient(server.url).search("Procedure"))
