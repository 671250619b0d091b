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
    t.suspend("p")
    assert t.register("p", 1, 1) is None
    assert t.forget_suspended() == ["p"]
    assert t.complete(old) is None and t.partitions() == []


def test_a_suspended_partition_takes_nothing_but_its_work_still_completes():
    t = OffsetTracker()
    t.assign("p", 1)
    running = [t.register("p", 1, o) for o in (4, 5, 6)]
    t.suspend("p")
    assert not t.owns("p") and not t.accepts("p", 1) and t.partitions() == []
    assert t.register("p", 1, 7) is None  # what the read-ahead held is skipped
    assert t.complete(running[0]) == 5  # reached, for the feed to commit at the revocation
    assert t.complete(running[1]) == 6
    assert t.committable("p") == 6 and t.outstanding("p") == 1


def test_handed_back_it_keeps_its_tracking_and_reads_on_after_the_last_taken():
    t = OffsetTracker()
    t.assign("p", 1)
    first, slow = t.register("p", 1, 10), t.register("p", 1, 11)
    t.complete(first)
    t.suspend("p")
    resumed = t.assign("p", 2)
    assert resumed is not None
    assert (resumed.position, resumed.committable) == (12, 11)
    assert t.forget_suspended() == [] and t.owns("p")
    assert t.register("p", 1, 12) is None  # the old assignment's read-ahead stays stale
    after = t.register("p", 2, 12)
    assert t.complete(after) is None  # 11 still runs
    assert t.complete(slow) == 13  # the work in flight across the hand-back still counts


def test_a_suspended_partition_that_took_nothing_reads_from_the_committed_offset():
    t = OffsetTracker()
    t.assign("p", 1)
    t.suspend("p")
    assert t.assign("p", 2) is None and t.owns("p")


def test_one_assigned_elsewhere_is_forgotten_at_the_next_assignment():
    t = OffsetTracker()
    t.assign("a", 1)
    t.assign("b", 1)
    a0, b0 = t.register("a", 1, 0), t.register("b", 1, 0)
    t.suspend("a")
    t.suspend("b")
    assert t.assign("a", 2) is not None
    assert t.forget_suspended() == ["b"]
    assert t.complete(b0) is None and t.outstanding() == 1
    assert t.complete(a0) == 1


def test_reassignment_starts_a_new_epoch():
    t = OffsetTracker()
    t.assign("p", 1)
    old = t.register("p", 1, 3)
    t.assign("p", 2)  # revoked and assigned back
    new = t.register("p", 2, 3)
    assert t.complete(old) is None  # stale: must not move the new assignment's commit
    assert t.outstanding("p") == 1
    assert t.complete(new) == 4


def test_an_offset_back_at_the_start_restarts_the_partition_without_raising():
    # An OFFSET_OUT_OF_RANGE reset to "earliest": the consumer hands 0, 1, ... again while
    # 5, 6 and 7 are still running.
    t = OffsetTracker()
    t.assign("p", 1)
    old = [t.register("p", 1, o) for o in (5, 6, 7)]
    assert t.complete(old[1]) is None
    new0 = t.register("p", 1, 0)
    assert new0 is not None and t.outstanding("p") == 1  # 5..7 come again: no longer pending
    # The earlier copies finishing cannot move the new commit, whatever their offsets.
    assert [t.complete(tok) for tok in old] == [None, None, None]
    new1 = t.register("p", 1, 1)
    assert t.complete(new1) is None  # 0 still running
    assert t.complete(new0) == 2
    # Tracking goes on normally from there, including the offsets seen before the reset.
    again = [t.register("p", 1, o) for o in (5, 6)]
    assert t.complete(again[0]) == 6 and t.complete(again[1]) == 7


def test_the_same_offset_again_restarts_and_only_its_new_copy_counts():
    t = OffsetTracker()
    t.assign("p", 1)
    first = t.register("p", 1, 5)
    second = t.register("p", 1, 5)  # handed over twice (a seek back to 5)
    assert second is not None and second != first
    assert t.complete(first) is None and t.outstanding("p") == 1
    assert t.complete(second) == 6


def test_a_restart_keeps_what_is_below_it_pending():
    # Back to 7 while 5..8 run: 7 and 8 come again, 5 and 6 do not, so the commit must still
    # wait for their work, and their (earlier generation) completions count.
    t = OffsetTracker()
    t.assign("p", 1)
    five, six, seven, eight = (t.register("p", 1, o) for o in (5, 6, 7, 8))
    assert t.complete(six) is None
    seven_again = t.register("p", 1, 7)
    assert t.outstanding("p") == 3  # 5 (running), 6 (done, behind 5), the new 7; 8 comes again
    assert t.complete(seven_again) is None  # 5 still running: nothing may commit yet
    assert t.complete(eight) is None and t.complete(seven) is None  # earlier copies: ignored
    assert t.complete(five) == 8
    eight_again = t.register("p", 1, 8)
    assert t.complete(eight_again) == 9


def test_repeated_restarts_never_commit_past_a_running_message():
    t = OffsetTracker()
    t.assign("p", 1)
    running = t.register("p", 1, 3)
    t.register("p", 1, 10)
    t.register("p", 1, 8)  # restart at 8: 3 stays pending
    nine = t.register("p", 1, 9)
    four = t.register("p", 1, 4)  # restart at 4: 3 still pending, 8 and 9 dropped
    assert t.complete(nine) is None and t.complete(four) is None
    assert t.outstanding("p") == 2
    assert t.complete(running) == 5


def test_outstanding_counts_every_partition_until_committable():
    t = OffsetTracker()
    t.assign("a", 1)
    t.assign("b", 1)
    a0, a1, b0 = t.register("a", 1, 0), t.register("a", 1, 1), t.register("b", 1, 0)
    assert t.outstanding() == 3
    t.complete(a1)  # done, but behind a0: still remembered
    assert t.outstanding() == 3
    t.complete(a0)
    t.suspend("b")
    assert t.outstanding() == 1  # its work still runs
    t.forget_suspended()
    assert t.outstanding() == 0 and b0 is not None
