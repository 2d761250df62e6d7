import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ("conversations", "0002_message_heartbeat_at"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="Feedback",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("rating", models.SmallIntegerField(choices=[(1, "thumbs up"), (-1, "thumbs down")])),
                ("category", models.CharField(blank=True, max_length=16, choices=[
                    ("inaccurate", "inaccurate"), ("unhelpful", "unhelpful"), ("harmful", "harmful or unsafe"),
                    ("too_long", "too long"), ("other", "other")])),
                ("comment", models.TextField(blank=True, max_length=4000)),
                ("model", models.CharField(blank=True, max_length=100)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                ("message", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="feedback",
                                              to="conversations.message")),
                ("user", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="feedback",
                                           to=settings.AUTH_USER_MODEL)),
            ],
            options={
                "verbose_name_plural": "feedback",
                "ordering": ["-updated_at"],
                "indexes": [models.Index(fields=["-updated_at"], name="feedback_newest")],
                "constraints": [models.UniqueConstraint(fields=("user", "message"),
                                                        name="feedback_one_per_user_reply")],
            },
        ),
    ]
