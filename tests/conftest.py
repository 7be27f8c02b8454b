import pytest

from .live import LiveNode, processes_of


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
