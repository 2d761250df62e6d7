from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Rule",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("kind", models.CharField(choices=[("term", "term"), ("regex", "regular expression")], default="term",
                                          max_length=8)),
                ("pattern", models.CharField(max_length=500)),
                ("category", models.CharField(choices=[
                    ("harassment", "harassment"), ("harassment/threatening", "harassment/threatening"),
                    ("hate", "hate"), ("hate/threatening", "hate/threatening"), ("illicit", "illicit"),
                    ("illicit/violent", "illicit/violent"), ("self-harm", "self-harm"),
                    ("self-harm/intent", "self-harm/intent"), ("self-harm/instructions", "self-harm/instructions"),
                    ("sexual", "sexual"), ("sexual/minors", "sexual/minors"), ("violence", "violence"),
                    ("violence/graphic", "violence/graphic"), ("prompt_injection", "prompt_injection"),
                    ("jailbreak", "jailbreak"), ("blocked_term", "blocked_term"),
                ], default="blocked_term", max_length=32)),
                ("action", models.CharField(choices=[("block", "block"), ("flag", "flag")], default="block",
                                            max_length=8)),
                ("applies_to_output", models.BooleanField(default=True,
                                                          help_text="Also stop replies that contain it.")),
                ("enabled", models.BooleanField(default=True)),
                ("note", models.CharField(blank=True, max_length=200)),
                ("updated_at", models.DateTimeField(auto_now=True)),
            ],
            options={"ordering": ["category", "pattern"]},
        ),
        migrations.AddConstraint(
            model_name="rule",
            constraint=models.UniqueConstraint(fields=("kind", "pattern"), name="safety_rule_unique_pattern"),
        ),
    ]
