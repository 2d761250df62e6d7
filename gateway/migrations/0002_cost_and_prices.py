# Issue 15: the ledger's cost, savings, ITL and generation time; model prices.

import django.contrib.postgres.indexes
from django.db import migrations, models


def _money(**kwargs):
    return models.DecimalField(decimal_places=9, default=0, max_digits=18, **kwargs)


def _price(**kwargs):
    return models.DecimalField(decimal_places=6, default=0, max_digits=12, **kwargs)


class Migration(migrations.Migration):

    dependencies = [
        ("gateway", "0001_initial"),
    ]

    operations = [
        migrations.AddField(model_name="usagerecord", name="cost", field=_money()),
        migrations.AddField(model_name="usagerecord", name="saved_cache", field=_money()),
        migrations.AddField(model_name="usagerecord", name="saved_prefix", field=_money()),
        migrations.AddField(model_name="usagerecord", name="saved_routing", field=_money()),
        migrations.AddField(
            model_name="usagerecord", name="itl_ms",
            field=models.FloatField(blank=True, null=True, help_text="mean inter-token latency (generated replies)"),
        ),
        migrations.AddField(
            model_name="usagerecord", name="generation_ms",
            field=models.PositiveIntegerField(blank=True, null=True, help_text="backend open to last event"),
        ),
        migrations.AddIndex(
            model_name="usagerecord",
            index=django.contrib.postgres.indexes.BrinIndex(fields=["created_at"], name="usage_created_brin"),
        ),
        migrations.CreateModel(
            name="ModelPrice",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("model", models.SlugField(help_text="the gateway's model name (pool or backend)", max_length=64,
                                           unique=True)),
                ("basis", models.CharField(choices=[("tokens", "per 1k tokens"),
                                                    ("hardware", "hardware time (local pools)")],
                                           default="tokens", max_length=16)),
                ("prompt_per_1k", _price()),
                ("cached_prompt_per_1k", _price(help_text="prompt tokens served from a prefix cache (0 on our own "
                                                          "engines; a provider's cached-input price)")),
                ("completion_per_1k", _price()),
                ("hardware_per_hour", _price(help_text="hardware basis: price per hour × generation seconds")),
            ],
        ),
    ]
