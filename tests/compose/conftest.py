"""The whole stack of deploy/docker-compose.yml, for the tests in this directory.

``make test-compose`` builds the images first (``make images``) and runs these; ``make test``
leaves them out. One stack serves every test (bringing it up takes ~30 s); it is torn down,
volumes included, also when a test fails, and the teardown fails if anything is left behind.
The stack's logs are saved to $INVOKER_STATE/compose-test/compose.log.
"""

import pytest

from tests.support.compose import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def stack():
    stack = Stack()
    stack.down()  # what an interrupted earlier run may have left
    try:
        stack.up()
        yield stack
    finally:
        logs = stack.save_logs()
        stack.down()
        left = stack.leftovers()
        assert not any(left.values()), f"left behind by down: {left} (logs: {logs})"
