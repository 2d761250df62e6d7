from django.contrib.auth import get_user_model
from django.db import connection, transaction

# Any constant works: it only has to be the same for every sign-up.
_SIGNUP_LOCK_KEY = 0x5157_0001


def user_sign_up(*, username: str, password: str, email: str = ""):
    """Create a user; the first account of the installation becomes the admin.

    The advisory lock serialises concurrent first sign-ups so exactly one of
    them sees an empty user table.
    """
    User = get_user_model()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_SIGNUP_LOCK_KEY])
        first = not User.objects.exists()
        user = User(username=username, email=email, is_staff=first, is_superuser=first)
        user.set_password(password)
        user.full_clean(exclude=["password"])
        user.save()
    return user
