"""Fixtures for every test, and how the suite is shared between pytest-xdist's workers (docs/performance.md, "The test
suite"): the tests that use the one shared live node (``live``) go to one worker so that they share one `serve`
start, and so do the Slurm tests (their ``portal``) and the tests of the cached trained models and compiled run
(built once, which the other worker would wait for); the slow flows are handed out first so that neither worker is
left with a long tail."""
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on a 2-core machine, each running tiny models (and a live node's training processes): one thread
    # each is faster than two that fight over both cores. Set before anything imports torch; inherited by the
    # engine subprocesses and the live nodes the tests start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Each worker its own broker queue and channel prefix when tests share one Redis.
    os.environ.setdefault("MINICLOUD_INSTANCE", f"minicloud-test-{os.environ['PYTEST_XDIST_WORKER']}")


def pytest_configure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller: where the first worker writes the groups
        os.environ["MINICLOUD_TEST_GROUPS"] = str(Path(tempfile.gettempdir()) / f"minicloud-groups-{os.getpid()}.json")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    result = yield
    # After the other plugins (pytest-django orders by database use; the order within each part stays): the live
    # node's tests, then the slow flows. xdist hands out work in this order (a group where its first test stands).
    items.sort(key=lambda item: ("live" not in getattr(item, "fixturenames", ()), not item.get_closest_marker("slow")))
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw0" and os.environ.get("MINICLOUD_TEST_GROUPS"):
        # the Slurm tests share their portal (and the one Slurm cluster, which two portals would fight over); the
        # tests of the cached trained models (and of the one compiled run) run in one worker too: a second worker
        # that needed them while the first built them waited idle for the build (44 s in a CI run)
        groups = {item.nodeid: group for item in items
                  for group, names in (("live", {"live"}), ("portal", {"portal", "gpu_portal"}),
                                       ("trained", {"trained"}), ("compiled", {"compiled_run"}))
                  if names & set(getattr(item, "fixturenames", ()))}
        Path(os.environ["MINICLOUD_TEST_GROUPS"]).write_text(json.dumps(groups))
    return result


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown where xdist is not loaded (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` with the groups the first worker wrote while collecting: xdist's own loadgroup renames
    a test's node id to mark its group, which pytest 9 no longer lets it do (every test ends up alone)."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        groups = None

        def _split_scope(self, nodeid):
            if self.groups is None:
                path = Path(os.environ["MINICLOUD_TEST_GROUPS"])
                self.groups = json.loads(path.read_text()) if path.exists() else {}
                path.unlink(missing_ok=True)
            return self.groups.get(nodeid, nodeid)

    return Groups(config, log)


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """In-process tests create many users; PBKDF2's 1,000,000 rounds cost 0.5-3.5 s each on a small CPU. The live
    nodes (end-to-end and browser tests) hash with MD5 too (tests/live_settings.py)."""
    from tests.live_settings import PASSWORD_HASHERS

    settings.PASSWORD_HASHERS = PASSWORD_HASHERS


@pytest.fixture(autouse=True)
def _plain_static_files(settings):
    """In-process tests render pages without running collectstatic first (`serve` runs it for real nodes)."""
    settings.STORAGES = {**settings.STORAGES,
                         "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}


@pytest.fixture(autouse=True)
def _english_unless_asked():
    """Each test starts in English (a page rendered in Chinese by an earlier test must not leak its language)."""
    from django.utils import translation

    translation.activate("en")
    yield
    translation.deactivate()


@pytest.fixture(autouse=True)
def _own_home_for_runs(settings, tmp_path):
    """Run folders (checkpoints, weights) of in-process tests go to a fresh folder, not the developer's var/."""
    settings.HOME = tmp_path / "home"
    settings.DATA_CACHE_DIR = settings.HOME / "cache" / "data"


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Nothing cached by an earlier test (the shared queue plan, say) is served to the next one."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def midweek():
    """The clock at Wednesday noon of this week, running on from there. The tests that put hours of use just before
    "now" need that much of the week behind them: the suite run early on a Monday (CI at 00:03 once) would count the
    part before Monday 00:00 in last week and fail."""
    import time_machine

    from accounts.services import week_start

    with time_machine.travel(week_start() + timedelta(days=2, hours=12), tick=True):
        yield


@pytest.fixture
def user(db):
    return get_user_model().objects.create_user("alice", password="alice-pass-123")


@pytest.fixture
def other_user(db):
    return get_user_model().objects.create_user("bob", password="bob-pass-123")


@pytest.fixture
def token(user):
    from accounts.models import ApiToken

    return ApiToken.issue(user)[1]


@pytest.fixture
def api(client, token):
    """The Django test client with a bearer token; ``api.get/post(path, data)`` send and return JSON responses."""

    class Api:
        def get(self, path, **kw):
            return client.get(path, HTTP_AUTHORIZATION=f"Bearer {token}", **kw)

        def post(self, path, data=None, **kw):
            import json

            return client.post(path, json.dumps(data or {}), content_type="application/json",
                               HTTP_AUTHORIZATION=f"Bearer {token}", **kw)

        def patch(self, path, data=None):
            import json

            return client.patch(path, json.dumps(data or {}), content_type="application/json",
                                HTTP_AUTHORIZATION=f"Bearer {token}")

        def delete(self, path):
            return client.delete(path, HTTP_AUTHORIZATION=f"Bearer {token}")

    return Api()


TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "batch_size": 16, "max_seq_len": 64, "accumulation_steps": 1, "learning_rate": 3e-3, "log_interval": 2}
