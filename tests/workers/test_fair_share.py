"""Fair share of a model's batch work among projects (workers.fair_share)."""

from collections import Counter

from workers.fair_share import FairShare


def turns(share: FairShare, weights: dict[str, float], count: int, chunk: int = 32) -> list[str]:
    """The projects served, `count` chunks in a row, all of them with work queued throughout."""
    served = []
    for _ in range(count):
        project = share.order(weights)[0]
        share.took(project, chunk, weights[project])
        served.append(project)
    return served


def test_equal_weights_take_turns() -> None:
    served = turns(FairShare(), {"a": 1, "b": 1}, 10)
    assert served == ["a", "b"] * 5


def test_shares_follow_the_weights() -> None:
    served = Counter(turns(FairShare(), {"a": 1, "b": 3, "c": 2}, 600))
    assert served == {"a": 100, "b": 300, "c": 200}


def test_a_newcomer_starts_level_and_is_served_at_once() -> None:
    share = FairShare()
    turns(share, {"a": 1}, 500)
    # b arrives behind 500 of a's chunks: level with a, they alternate from now on; b is not
    # owed the 500 turns it was not there for.
    assert turns(share, {"a": 1, "b": 1}, 6) == ["a", "b", "a", "b", "a", "b"]


def test_a_project_whose_queue_ran_empty_banks_nothing() -> None:
    share = FairShare()
    turns(share, {"a": 1, "b": 1}, 4)
    turns(share, {"a": 1}, 100)  # b had nothing queued
    served = Counter(turns(share, {"a": 1, "b": 1}, 10))
    assert served == {"a": 5, "b": 5}


def test_a_smaller_last_chunk_counts_for_what_it_held() -> None:
    share = FairShare()
    share.took("a", 32, 1)
    share.took("b", 8, 1)
    # b has had a quarter of a's work: it is served until level.
    assert share.order({"a": 1, "b": 1})[0] == "b"
    share.took("b", 24, 1)
    assert share.taken == {"a": 32.0, "b": 32.0}
