from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from gateway.keys import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a user and print it (shown only this once; stored hashed)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="a label to recognise the key by")

    def handle(self, *args, username, name, **options):
        User = get_user_model()
        try:
            user = User.objects.get(username=username)
        except User.DoesNotExist:
            raise CommandError(f"No user named {username!r}") from None
        _, raw = api_key_create(user=user, name=name)
        self.stdout.write(raw)
