from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="MinuteRollup",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("minute", models.DateTimeField()),
                ("model", models.CharField(help_text="the backend that served (empty: none did)", max_length=64)),
                ("requests", models.PositiveIntegerField(default=0)),
                ("completed", models.PositiveIntegerField(default=0, help_text="stop or length")),
                ("aborted", models.PositiveIntegerField(default=0, help_text="Stop pressed, reader gone, or interrupted")),
                ("errors", models.PositiveIntegerField(default=0)),
                ("blocked", models.PositiveIntegerField(default=0, help_text="prompt blocked or reply filtered")),
                ("cache_hits", models.PositiveIntegerField(default=0)),
                ("prompt_tokens", models.BigIntegerField(default=0)),
                ("completion_tokens", models.BigIntegerField(default=0)),
                ("cached_tokens", models.BigIntegerField(default=0)),
                ("ttft_p50_ms", models.FloatField(blank=True, null=True)),
                ("ttft_p95_ms", models.FloatField(blank=True, null=True)),
                ("itl_p50_ms", models.FloatField(blank=True, null=True)),
                ("itl_p95_ms", models.FloatField(blank=True, null=True)),
                ("cost", models.DecimalField(decimal_places=9, default=0, max_digits=18)),
                ("saved_cache", models.DecimalField(decimal_places=9, default=0, max_digits=18)),
                ("saved_prefix", models.DecimalField(decimal_places=9, default=0, max_digits=18)),
                ("saved_routing", models.DecimalField(decimal_places=9, default=0, max_digits=18)),
            ],
            options={
                "ordering": ["minute", "model"],
                "constraints": [models.UniqueConstraint(fields=("minute", "model"), name="rollup_minute_model")],
            },
        ),
    ]
