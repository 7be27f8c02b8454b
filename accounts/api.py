from django.contrib.auth import authenticate
from django.utils.translation import gettext as _

from jobs.services import usage_summary
from minicloud.api import ApiError, endpoint, json_body

from . import services
from .access import role_of
from .models import ApiToken
from .views import shared_object


@endpoint("POST", auth=False)
def token(request):
    data = json_body(request)
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise ApiError(400, _("username and password are required strings"))
    wait = services.login_wait(username, services.client_ip(request))
    if wait:
        raise ApiError(429, _("too many failed logins: try again in %(seconds)s s") % {"seconds": wait},
                       {"retry_after_s": wait})
    user = authenticate(request, username=username, password=password)
    if user is None:
        raise ApiError(401, _("invalid username or password"))
    raw = ApiToken.issue(user)[1]
    return {"token": raw, "username": user.username}


@endpoint("GET")
def me(request):
    u = request.user
    return {"id": u.pk, "username": u.username, "email": u.email,
            "role": role_of(u),
            "groups": [{"id": g.pk, "name": g.name} for g in u.groups.order_by("name")], **usage_summary(u)}


@endpoint("POST")
def share(request, pk, kind):
    """``{"visibility": "private" | "group" | "public", "group": id}`` for one of your jobs, datasets or models."""
    from django.contrib.auth.models import Group

    obj = shared_object(request.user, kind, pk)
    data = json_body(request)
    group = None
    if data.get("group") is not None:
        raw = data["group"]
        group = Group.objects.filter(pk=raw).first() if type(raw) is int and 0 < raw < 2**63 else None
        if group is None:
            raise ApiError(400, _("group: an id of one of your groups"), {"field": "group"})
    services.set_visibility(request.user, obj, data.get("visibility", ""), group, request=request)
    return obj.to_dict()
