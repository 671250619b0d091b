"""What a compose test's failure says of a wedged Docker engine: the goroutines of dockerd's
stack dump (deploy/docker-engine.sh stacks) waiting on a lock for minutes, grouped by stack."""

from tests.support.engine import long_blocked

DUMP = """goroutine 1 [running]:
main.main()
\t/go/src/main.go:10 +0x1

goroutine 7 [semacquire, 12 minutes]:
sync.runtime_SemacquireMutex(0xc000, 0x0, 0x1)
\t/usr/lib/go/src/runtime/sema.go:71 +0x47
github.com/docker/libnetwork.(*network).getSvcRecords(0xc0001, 0xc0002)
\t/build/libnetwork/network.go:1400 +0x85

goroutine 8 [semacquire, 11 minutes]:
sync.runtime_SemacquireMutex(0xc001, 0x0, 0x1)
\t/usr/lib/go/src/runtime/sema.go:71 +0x47
github.com/docker/libnetwork.(*network).getSvcRecords(0xc0003, 0xc0004)
\t/build/libnetwork/network.go:1400 +0x85

goroutine 9 [select, 2 minutes]:
github.com/docker/libnetwork.(*controller).watchLoop(0xc0005)
\t/build/libnetwork/store.go:400 +0x10

goroutine 11 [sync.Mutex.Lock, 3 minutes]:
sync.(*Mutex).Lock(...)
\t/usr/lib/go/src/sync/mutex.go:90
github.com/docker/libnetwork.(*network).ID(0xc0006)
\t/build/libnetwork/network.go:230 +0x3c
github.com/docker/libnetwork.(*controller).processEndpointDelete(0xc0007, 0xc0008)
\t/build/libnetwork/store.go:380 +0x1d

goroutine 10 [IO wait]:
internal/poll.runtime_pollWait(0x7f, 0x72)
\t/usr/lib/go/src/runtime/netpoll.go:305 +0x89
"""


def test_goroutines_blocked_for_minutes_grouped_by_stack_largest_group_first():
    text = long_blocked(DUMP, min_minutes=1)
    assert text.splitlines() == [
        "2 goroutine(s) [semacquire]:",
        "    sync.runtime_SemacquireMutex",
        "    github.com/docker/libnetwork.(*network).getSvcRecords",
        "1 goroutine(s) [sync.Mutex.Lock]:",
        "    sync.(*Mutex).Lock",
        "    github.com/docker/libnetwork.(*network).ID",
        "    github.com/docker/libnetwork.(*controller).processEndpointDelete",
    ]  # not the select nor the I/O wait: idle, not waiting on a lock


def test_none_blocked_that_long():
    assert long_blocked(DUMP, min_minutes=20) == (
        "no goroutine waiting on a lock for 20 minute(s) or more")
