"""The site's own error view: a 400 that keeps the site's header and language and says what was wrong."""
from django.core.exceptions import BadRequest
from django.shortcuts import render


def bad_request(request, exception):
    """Django's default shows a bare page; ours names the reason where it is one of our own (``BadRequest``), not
    Django's security refusals (their messages are for the log)."""
    reason = str(exception) if type(exception) is BadRequest else ""
    return render(request, "400.html", {"reason": reason}, status=400)
