from django import forms
from django.conf import settings
from django.contrib.auth.forms import UserCreationForm


class SignUpForm(UserCreationForm):
    """Validation only; the account is created by accounts.services.user_sign_up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if settings.SIGNUP_POLICY == "invite":
            self.fields["invite_code"] = forms.CharField(max_length=64, help_text="Sign-up is by invitation.")

    def save(self, commit=True):  # pragma: no cover - guarded: the view never calls it
        raise RuntimeError("use accounts.services.user_sign_up")


class SetupForm(UserCreationForm):
    """The first admin's account, with the one-time token `serve` printed."""

    setup_token = forms.CharField(max_length=100, help_text="printed by `manage.py serve` at start")

    def save(self, commit=True):  # pragma: no cover - guarded: the view never calls it
        raise RuntimeError("use accounts.services.admin_create_with_token")
