from django.contrib.postgres.operations import CreateExtension
from django.db import migrations


class Migration(migrations.Migration):
    """pgvector backs the semantic cache and document search."""

    initial = True
    dependencies = []
    operations = [CreateExtension("vector")]
