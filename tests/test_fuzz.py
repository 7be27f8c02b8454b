"""The API under a fuzzer: schemathesis generates requests from ``/api/v1/openapi.json`` (every operation, valid and
malformed bodies, odd ids and query values) and sends them, authenticated, to the WSGI application; no answer may
be a 500 (docs/security.md, "Threat model"). Bounded: MINICLOUD_FUZZ_EXAMPLES cases per operation (20 by default,
so that CI stays quick; raise it for a longer hunt). It runs in the PostgreSQL pass of .ci/run (the SQLite pass is
the longer one); MINICLOUD_FUZZ=1 runs it on SQLite too."""
import os

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, Phase, settings as hypothesis_settings

pytestmark = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres") and not os.environ.get("MINICLOUD_FUZZ"),
    reason="the bounded fuzz run is in the PostgreSQL pass of .ci/run (MINICLOUD_FUZZ=1 runs it here)")
schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", get_wsgi_application())
EXAMPLES = int(os.environ.get("MINICLOUD_FUZZ_EXAMPLES", "20"))


@pytest.fixture
def bearer(db):
    """A member's token; the requests run in the test's transaction (as Django's test client does, the handler may
    not close the test's database connection after each request)."""
    from django.contrib.auth import get_user_model
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    from accounts.models import ApiToken

    user = get_user_model().objects.create_user("fuzzer", password="fuzzer-pass-123")
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    try:
        yield {"Authorization": f"Bearer {ApiToken.issue(user)[1]}"}
    finally:
        for signal in (request_started, request_finished):
            signal.connect(close_old_connections)


@schema.parametrize()
@hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                     suppress_health_check=list(HealthCheck))
def test_no_api_operation_answers_a_500(case, bearer):
    response = case.call(headers=bearer)
    assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])
