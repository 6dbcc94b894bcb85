"""The service tests' servers (tests/unit/server/conftest.py) for the job tests."""

from tests.unit.server.conftest import channel, executor, make_server, server, stub  # noqa: F401
