import pytest
from django.contrib.auth import get_user_model


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


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Nothing cached by an earlier test (the shared queue plan, say) is served to the next one."""
    from django.core.cache import cache

    cache.clear()


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
