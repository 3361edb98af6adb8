"""The health board's rules for a state that stops answering, a skewed clock, the HL7 v2 receiver and loops that
wait on the state (adapter/health.py), on a fake monotonic clock; the real faults are in
tests/integration/test_health_faults.py."""

from __future__ import annotations

from adapter.health import Health, LoopStatus
from adapter.settings import HealthSettings
from adapter.state.base import StateStats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def board(**settings: float) -> tuple[Health, Clock]:
    clock = Clock()
    health = Health(HealthSettings(**settings), clock=clock, wall=lambda: 5_000_000.0)  # type: ignore[arg-type]
    return health, clock


def test_a_state_that_stops_answering_heartbeats_is_reported_after_the_deadline() -> None:
    health, clock = board(deadline_seconds=10)
    clock.now += 60
    assert health.check().ok  # nobody beats: nothing to judge (sync, replay)
    health.watch_heartbeats()
    health.heartbeat_answered(0.0)
    clock.now += 9.9
    assert health.check().ok  # a heartbeat may still be on its way
    clock.now += 0.2
    assert health.check().reasons == ["state not answering for 10 s (a heartbeat is still waiting for it)"]
    health.heartbeat_failed("no answer from the server within 5 s (client-side deadline)")
    clock.now += 5
    assert health.check().reasons == ["state not answering for 15 s: no answer from the server within 5 s "
                                      "(client-side deadline)"]
    health.heartbeat_answered(0.0)
    assert health.check().ok


def test_queue_ages_use_the_states_clock_not_the_local_one() -> None:
    health, clock = board(max_queue_age_seconds=900)
    # the local wall clock (5,000,000) is 20 minutes ahead of the database's (4,998,800): the age stays 10 s
    health.set_stats(StateStats(1, 0, 4_998_790.0, 0, 0, None, read_at=4_998_800.0))
    assert health.oldest_queued_seconds() == 10.0 and health.check().ok
    clock.now += 30  # time passes between two reads of the stats: measured locally, as a duration
    assert health.check().body["oldest_queued_seconds"] == 40.0


def test_a_skewed_clock_is_measured_and_named_beyond_the_bound() -> None:
    health, _ = board(max_clock_skew_seconds=5)
    health.watch_heartbeats()
    health.heartbeat_answered(1.5)
    body = health.check().body
    assert body["clock_skew_seconds"] == 1.5 and "warnings" not in body
    health.heartbeat_answered(-1200.0)
    verdict = health.check()
    assert verdict.ok and verdict.body["clock_skew_seconds"] == -1200.0
    assert verdict.body["warnings"][0].startswith("this host's clock is 1200 s behind the state's")


def test_an_unreachable_hl7v2_receiver_is_named_after_its_threshold() -> None:
    health, clock = board(hl7v2_unreachable_seconds=30)
    assert "hl7v2" not in health.check().body  # no sink, nothing said
    health.sink_enabled("mllp://billing:6661")
    assert health.check().body["hl7v2"] == "ok"
    health.hl7v2(False, "mllp://billing:6661: cannot connect (Connection refused)")
    clock.now += 29
    assert health.check().ok
    clock.now += 2
    verdict = health.check()
    assert verdict.reasons == ["HL7 v2 receiver mllp://billing:6661 failing for 31 s: mllp://billing:6661: cannot "
                               "connect (Connection refused)"]
    assert verdict.body["hl7v2"].startswith("failing for 31 s")
    health.hl7v2(True)
    assert health.check().ok


def test_a_loop_is_reported_by_what_it_waits_on() -> None:
    health, clock = board(deadline_seconds=10, stuck_loop_seconds=600)
    since = clock.now
    loops = [LoopStatus("worker", turn_started=since, waiting_on="the state postgresql://db (record_pass)",
                        waiting_since=since),
             LoopStatus("poll", turn_started=since, waiting_on="the FHIR server http://fhir:8080", waiting_since=since)]
    health.watch_loops(lambda: loops)
    clock.now += 12
    verdict = health.check()
    assert verdict.reasons == ["loop worker waiting on the state postgresql://db (record_pass) for 12 s"]
    assert verdict.body["loops"]["poll"] == "ok"  # a slow FHIR answer is the FHIR rules' business
    clock.now += 600
    assert verdict.reasons[0].startswith("loop worker") and \
        "loop poll stuck in one turn for 612 s, waiting on the FHIR server http://fhir:8080 for 612 s" \
        in health.check().reasons
