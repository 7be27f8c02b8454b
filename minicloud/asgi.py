"""ASGI entry point: HTTP through Django, WebSockets through Channels (session or API-token auth)."""
import gc
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minicloud.settings")
django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application does

from django.conf import settings  # noqa: E402
from minicloud.handler import WebHandler  # noqa: E402  (needs the app registry)

# Django's ASGI handler with its request threads kept, one crossing to them, one request at a time (its docstring)
django_asgi_app = WebHandler(running=settings.WEB_REQUESTS, long_after_s=settings.WEB_LONG_REQUEST_MS / 1000)

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the app registry)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from jobs.routing import websocket_urlpatterns  # noqa: E402
from minicloud.bodylimit import BodyLimit  # noqa: E402
from minicloud.wsauth import TokenAuthMiddleware  # noqa: E402

application = ProtocolTypeRouter({
    "http": BodyLimit(django_asgi_app),
    "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))),
})


def _warm_up() -> None:
    """Build what the first requests would: the URL maps, our templates, both languages' catalogues."""
    from django.conf import settings
    from django.template.loader import get_template
    from django.urls import get_resolver
    from django.utils import translation

    get_resolver().reverse_dict
    if settings.REDIS_URL:  # the job broker's and the channel layer's clients (a first submission paid 0.3 s)
        import channels_redis.core  # noqa: F401
        import django_q.brokers.redis_broker  # noqa: F401
    for code, _ in settings.LANGUAGES:
        with translation.override(code):
            translation.gettext("Dashboard")
    for folder in settings.TEMPLATES[0]["DIRS"]:
        for path in folder.rglob("*.html"):
            get_template(str(path.relative_to(folder)))


# A full garbage collection of a web process walks every object it holds (~120,000 after start-up, ~90 ms with the GIL
# held: a stall for every request of the process). What exists once the process is ready lives as long as the
# process, so it is moved out of the collector's sight (gc.freeze, as large Django sites do after start-up).
_warm_up()
gc.freeze()
