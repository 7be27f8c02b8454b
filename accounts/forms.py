from django import forms
from django.contrib.auth.forms import AuthenticationForm
from django.utils.translation import gettext_lazy as _

from .services import client_ip, login_wait


class RateLimitedAuthenticationForm(AuthenticationForm):
    """Django's login form, refusing further tries for a while after too many failures for the username from this
    address (accounts.services.login_wait: a growing wait, never a lockout of everyone)."""

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        wait = login_wait(username, client_ip(self.request))
        if wait:
            raise forms.ValidationError(_("Too many failed logins: try again in %(seconds)s s.") % {"seconds": wait},
                                        code="throttled")
        return super().clean()


class UsersImportForm(forms.Form):
    file = forms.FileField(label=_("CSV file (username,name,email,group)"))
