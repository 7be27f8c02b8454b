from django import forms
from django.contrib.auth.forms import AuthenticationForm
from django.utils.translation import gettext_lazy as _

from .services import client_ip, login_blocked


class RateLimitedAuthenticationForm(AuthenticationForm):
    """Django's login form, refusing further tries after too many failures for the username or the address."""

    def clean(self):
        username = self.cleaned_data.get("username") or ""
        if login_blocked(username, client_ip(self.request)):
            raise forms.ValidationError(_("Too many failed logins: try again in a few minutes."), code="throttled")
        return super().clean()


class UsersImportForm(forms.Form):
    file = forms.FileField(label=_("CSV file (username,name,email,group)"))
