import pytest

from invoker.offsets import OffsetTracker


def test_commits_only_contiguous_prefix():
    t = OffsetTracker()
    t.assign("p0", 1)
    tokens = [t.register("p0", 1, o) for o in (5, 6, 7, 8)]
    assert t.complete(tokens[1]) is None  # 6 done, 5 still running
    assert t.complete(tokens[3]) is None
    assert t.complete(tokens[0]) == 7  # 5 and 6 done → next to read is 7
    assert t.complete(tokens[2]) == 9  # 7 and 8 → 9
    assert t.outstanding("p0") == 0


def test_partitions_are_independent():
    t = OffsetTracker()
    t.assign("a", 1)
    t.assign("b", 1)
    a0, b0 = t.register("a", 1, 0), t.register("b", 1, 0)
    a1 = t.register("a", 1, 1)
    assert t.complete(a1) is None
    assert t.complete(b0) == 1
    assert t.complete(a0) == 2


def test_gaps_between_offsets_are_allowed():
    # Compacted topics and transaction markers leave gaps; commit past the last one done.
    t = OffsetTracker()
    t.assign("p", 1)
    x, y = t.register("p", 1, 10), t.register("p", 1, 20)
    assert t.complete(x) == 11
    assert t.complete(y) == 21


def test_revoked_partition_ignores_late_completions():
    t = OffsetTracker()
    t.assign("p", 1)
    old = t.register("p", 1, 0)
    t.revoke("p")
    assert t.register("p", 1, 1) is None
    assert t.complete(old) is None


def test_reassignment_starts_a_new_epoch():
    t = OffsetTracker()
    t.assign("p", 1)
    old = t.register("p", 1, 3)
    t.assign("p", 2)  # revoked and assigned back
    new = t.register("p", 2, 3)
    assert t.complete(old) is None  # stale: must not move the new assignment's commit
    assert t.outstanding("p") == 1
    assert t.complete(new) == 4


def test_out_of_order_registration_is_a_bug():
    t = OffsetTracker()
    t.assign("p", 1)
    t.register("p", 1, 5)
    with pytest.raises(ValueError):
        t.register("p", 1, 5)


def test_outstanding_counts_every_partition_until_committable():
    t = OffsetTracker()
    t.assign("a", 1)
    t.assign("b", 1)
    a0, a1, b0 = t.register("a", 1, 0), t.register("a", 1, 1), t.register("b", 1, 0)
    assert t.outstanding() == 3
    t.complete(a1)  # done, but behind a0: still remembered
    assert t.outstanding() == 3
    t.complete(a0)
    t.revoke("b")
    assert t.outstanding() == 0 and b0 is not None
