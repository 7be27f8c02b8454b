from django.contrib.auth import authenticate

from minicloud.api import ApiError, endpoint, json_body

from .models import ApiToken
from .services import usage_summary


@endpoint("POST", auth=False)
def token(request):
    data = json_body(request)
    username, password = data.get("username"), data.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise ApiError(400, "username and password are required strings")
    user = authenticate(request, username=username, password=password)
    if user is None:
        raise ApiError(401, "invalid username or password")
    _, raw = ApiToken.issue(user)
    return {"token": raw, "username": user.username}


@endpoint("GET")
def me(request):
    u = request.user
    return {"id": u.pk, "username": u.username, "email": u.email,
            "role": "admin" if u.is_superuser else ("staff" if u.is_staff else "member"),
            "groups": sorted(g.name for g in u.groups.all()), **usage_summary(u)}
