"""Where a gRPC subscription resumes from (nexus/resume.py): what a server's answer says and what the next call
asks for. Each rule is a way an event would otherwise be lost or repeated after a cut; the SDK's subscription
(tests/test_client_reconnect.py, tests/test_server_e2e.py) runs these rules against real servers."""

from __future__ import annotations

import pytest

from nexus.resume import Answer, ResumePoint

# --- Answer: the initial metadata of a subscribe call ---------------------------------------------------------


def test_no_answer_when_the_call_failed_before_a_server_answered() -> None:
    """gRPC "returns" empty initial metadata for a call to a closed port: that is no answer, not an epoch of ""."""
    assert Answer.read(None) is None
    assert Answer.read(()) is None
    assert Answer.read({}) is None
    assert Answer.read([("nexus-head-offset", "5"), ("content-type", "application/grpc")]) is None


@pytest.mark.parametrize(
    ("recovered", "expected"), [(None, None), ("true", True), ("false", False), ("TRUE", False), ("", False)]
)
def test_an_answer_is_read_from_pairs_or_a_mapping(recovered: str | None, expected: bool | None) -> None:
    pairs = [("nexus-epoch", "e1"), ("nexus-head-offset", "42")]
    if recovered is not None:
        pairs.append(("nexus-recovered", recovered))
    want = Answer(epoch="e1", head_offset=42, recovered=expected)
    assert Answer.read(pairs) == want
    assert Answer.read(dict(pairs)) == want


def test_an_answer_without_a_head_says_head_0() -> None:
    assert Answer.read({"nexus-epoch": ""}) == Answer(epoch="", head_offset=0, recovered=None)


@pytest.mark.parametrize("head", ["-1", "1.5", "x", " 3", "", "²", "٣"])
def test_a_head_that_is_not_a_whole_number_is_refused_by_name(head: str) -> None:
    with pytest.raises(ValueError, match=r"^nexus-head-offset must be a non-negative integer, got '"):
        Answer.read({"nexus-epoch": "e", "nexus-head-offset": head})


def test_a_refused_head_is_quoted_short() -> None:
    with pytest.raises(ValueError, match="nexus-head-offset") as refused:
        Answer.read({"nexus-epoch": "e", "nexus-head-offset": "9" * 39 + "x" * 100})
    assert str(refused.value).endswith(repr("9" * 39 + "x"))


@pytest.mark.parametrize(
    ("answer", "metadata"),
    [
        (Answer("e1", 7), (("nexus-epoch", "e1"), ("nexus-head-offset", "7"))),
        (Answer("e1", 0, True), (("nexus-epoch", "e1"), ("nexus-head-offset", "0"), ("nexus-recovered", "true"))),
        (Answer("e2", 9, False), (("nexus-epoch", "e2"), ("nexus-head-offset", "9"), ("nexus-recovered", "false"))),
    ],
)
def test_a_server_sends_the_answer_as_initial_metadata_a_client_reads_back(
    answer: Answer, metadata: tuple[tuple[str, str], ...]
) -> None:
    assert answer.metadata() == metadata
    assert Answer.read(answer.metadata()) == answer


# --- ResumePoint: what the next call asks for -----------------------------------------------------------------


def test_a_new_subscription_asks_for_what_it_was_given() -> None:
    point = ResumePoint()
    assert point.ask() == (0, "")  # live
    assert (point.last_offset, point.epoch, point.head_offset, point.recovered) == (0, "", 0, None)
    assert ResumePoint(5).ask() == (5, "")  # after offset 5 of whatever epoch the server has
    assert ResumePoint(5, None).ask() == (5, "")
    assert ResumePoint(5, "e1").ask() == (5, "e1")
    assert ResumePoint(0, "e1").ask() == (0, "e1")  # everything of epoch e1, not "live"


def test_a_negative_offset_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^since_offset must be 0 or more, got -1$"):
        ResumePoint(-1)
    assert ResumePoint(0).last_offset == 0


def test_a_live_start_resumes_after_the_head_it_went_live_at() -> None:
    """Cut off before it received anything, a live subscription still asks for what was stored meanwhile."""
    point = ResumePoint()
    point.answered(Answer("e1", 40))
    assert point.ask() == (40, "e1")
    assert (point.last_offset, point.epoch, point.head_offset, point.recovered) == (40, "e1", 40, None)


def test_a_live_start_on_an_empty_bus_resumes_from_the_start_of_that_epoch() -> None:
    """Offset 0 with the epoch is "everything of e1": what was stored while it was cut off, never "live"."""
    point = ResumePoint()
    point.answered(Answer("e1", 0))
    assert point.ask() == (0, "e1")


def test_heartbeats_never_move_the_resume_point() -> None:
    point = ResumePoint()
    point.answered(Answer("e1", 3))
    point.delivered(4)
    point.delivered(0)  # a heartbeat
    assert point.ask() == (4, "e1")
    point.delivered(5)
    point.delivered(0)
    assert point.ask() == (5, "e1")


def test_delivered_offsets_move_it_forward_only() -> None:
    point = ResumePoint(10, "e1")
    point.delivered(11)
    assert point.last_offset == 11
    point.delivered(11)
    point.delivered(7)
    assert point.last_offset == 11
    point.delivered(12)
    assert point.last_offset == 12


def test_a_recovered_resumption_keeps_its_offset_and_learns_the_head() -> None:
    point = ResumePoint(7, "e1")
    point.answered(Answer("e1", 30, True))
    assert point.ask() == (7, "e1")  # the replay brings 8..30
    assert (point.head_offset, point.recovered) == (30, True)


def test_a_resumption_without_an_epoch_learns_the_servers() -> None:
    point = ResumePoint(7)
    point.answered(Answer("e1", 30, True))
    assert point.ask() == (7, "e1")


def test_a_gap_no_longer_held_goes_on_from_the_head_of_the_new_history() -> None:
    """recovered: false (another epoch, or the gap gone): the next call must not ask for offsets of a history that
    no longer exists, and says so by its new epoch."""
    point = ResumePoint(7, "e1")
    point.answered(Answer("e2", 3, False))
    assert point.ask() == (3, "e2")
    assert point.recovered is False
    point.answered(Answer("e2", 0, False))
    assert point.ask() == (0, "e2")  # even back to the start of an emptied history


def test_an_answer_that_ignored_the_resume_request_keeps_the_offset() -> None:
    """A server that answers without `recovered` was asked for nothing it knew of: the offset stays."""
    point = ResumePoint(50, "e1")
    point.answered(Answer("e1", 20))
    assert point.ask() == (50, "e1")


def test_a_subscription_over_several_cuts() -> None:
    """Live start, events, a heartbeat, a recovered cut, then a server that lost the gap."""
    point = ResumePoint()
    point.answered(Answer("e1", 100))  # live after 100
    for offset in (101, 0, 102):
        point.delivered(offset)
    assert point.ask() == (102, "e1")
    point.answered(Answer("e1", 110, True))  # replayed 103..110
    for offset in range(103, 111):
        point.delivered(offset)
    assert point.ask() == (110, "e1")
    point.answered(Answer("e9", 2, False))  # a new history
    point.delivered(3)
    assert point.ask() == (3, "e9")
    assert (point.head_offset, point.recovered) == (2, False)
