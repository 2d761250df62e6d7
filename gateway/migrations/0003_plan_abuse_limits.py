import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("gateway", "0002_cost_and_prices")]

    operations = [
        migrations.AddField(
            model_name="plan",
            name="max_concurrent",
            field=models.PositiveIntegerField(
                default=4,
                help_text="generations one user may have in flight at once (chat and API together); 0 = no cap",
            ),
        ),
        migrations.AddField(
            model_name="plan",
            name="priority",
            field=models.PositiveSmallIntegerField(
                default=0,
                help_text="0-100: in a capacity spike lower priorities are refused first (429), 100 last",
                validators=[django.core.validators.MaxValueValidator(100)],
            ),
        ),
    ]
