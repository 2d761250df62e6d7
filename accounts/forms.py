from django.contrib.auth.forms import UserCreationForm


class SignUpForm(UserCreationForm):
    """Validation only; the account is created by accounts.services.user_sign_up."""

    def save(self, commit=True):  # pragma: no cover - guarded: the view never calls it
        raise RuntimeError("use accounts.services.user_sign_up")
