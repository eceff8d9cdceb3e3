"""The transformers engine's scheduler: admission up to max_batch_size in arrival order, cancelled
rows dropped, one Score job per iteration, and the running batch's rows leaving in order."""

from __future__ import annotations

from attnserve.engines.base import EngineRequest, ScoreRequest
from attnserve.engines.hf.requests import RequestRow, ScoreJob
from attnserve.engines.hf.scheduler import Scheduler


def _row(name: str) -> RequestRow:
    return RequestRow(
        EngineRequest(name, (1, 2, 3)), emit=lambda item: None, detokenizer=None, generator=None
    )


def _job(name: str) -> ScoreJob:
    return ScoreJob(ScoreRequest(name, (1, 2), ((3,),)), emit=lambda item: None)


def _names(rows) -> list[str]:
    return [r.request.request_id for r in rows]


def test_admits_up_to_the_free_slots_in_arrival_order():
    scheduler = Scheduler(max_batch_size=3)
    for name in "abcd":
        scheduler.add_row(_row(name))
    first = scheduler.schedule()
    assert _names(first.admitted) == ["a", "b", "c"] and first.score is None
    scheduler.join_running(first.admitted)
    assert (scheduler.num_running, scheduler.num_waiting) == (3, 1)
    # The batch is full: d waits until a row leaves.
    assert scheduler.schedule().admitted == []
    assert scheduler.leave_running([first.admitted[1]]) == [0, 2]
    assert _names(scheduler.running) == ["a", "c"]
    assert _names(scheduler.schedule().admitted) == ["d"]


def test_cancelled_rows_are_dropped_and_reported():
    scheduler = Scheduler(max_batch_size=4)
    waiting, running = _row("waiting"), _row("running")
    scheduler.add_row(running)
    scheduler.join_running(scheduler.schedule().admitted)
    scheduler.add_row(waiting)
    waiting.cancelled = running.cancelled = True
    assert scheduler.schedule().admitted == []
    assert scheduler.num_waiting == 0
    assert scheduler.cancelled_running() == [running]
    assert scheduler.leave_running([]) is None
    assert scheduler.leave_running([running]) == []


def test_one_score_job_per_iteration_beside_the_admitted_rows():
    scheduler = Scheduler(max_batch_size=4)
    scheduler.add_score(_job("s1"))
    scheduler.add_score(_job("s2"))
    scheduler.add_row(_row("a"))
    first, second = scheduler.schedule(), scheduler.schedule()
    assert first.score.request.request_id == "s1" and _names(first.admitted) == ["a"]
    assert second.score.request.request_id == "s2" and second.admitted == []
    assert scheduler.num_waiting == 0


def test_stop_ends_scheduling():
    scheduler = Scheduler(max_batch_size=4)
    scheduler.add_row(_row("a"))
    scheduler.stop()
    assert scheduler.schedule() is None
