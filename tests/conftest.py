import pytest

from .live import LiveNode, processes_of


@pytest.fixture(autouse=True)
def _close_the_async_tests_connections(request):
    """An asynchronous test (the WebSocket consumer's) queries through ``database_sync_to_async`` from pytest's own
    event loop, with no ``async_to_sync`` around it: asgiref runs those queries in its one shared thread, whose
    database connection Django never closes. Closed after each such test: PostgreSQL refuses to drop a test database
    that a session still uses."""
    yield
    if request.node.get_closest_marker("asyncio"):
        from asgiref.sync import SyncToAsync
        from django.db import connections

        SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=30)


@pytest.fixture(scope="session")
def live(tmp_path_factory):
    """One real node shared by the end-to-end, WebSocket and browser tests."""
    node = LiveNode(tmp_path_factory.mktemp("minicloud-home")).start()
    try:
        yield node
    finally:
        rc = node.stop()
        node.drop_database()
        assert rc == 0, node.log()
        assert processes_of(node.home) == [], "serve must leave nothing running"
