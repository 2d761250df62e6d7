import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models

# The database itself keeps the log append-only: no DELETE, and no UPDATE
# except the one Django makes when a user is deleted (their foreign keys here
# become NULL; the copied names stay).
TRIGGER = """
CREATE FUNCTION audit_event_append_only() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    RAISE EXCEPTION 'audit events cannot be deleted';
  END IF;
  IF NEW.id <> OLD.id OR NEW.created_at <> OLD.created_at OR NEW.kind <> OLD.kind
     OR NEW.actor_name <> OLD.actor_name OR NEW.target_name <> OLD.target_name
     OR NEW.ip IS DISTINCT FROM OLD.ip OR NEW.summary <> OLD.summary OR NEW.data <> OLD.data
     OR (NEW.actor_id IS NOT NULL AND NEW.actor_id IS DISTINCT FROM OLD.actor_id)
     OR (NEW.target_user_id IS NOT NULL AND NEW.target_user_id IS DISTINCT FROM OLD.target_user_id) THEN
    RAISE EXCEPTION 'audit events cannot be changed';
  END IF;
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_auditevent
  FOR EACH ROW EXECUTE FUNCTION audit_event_append_only();
"""
DROP_TRIGGER = """
DROP TRIGGER IF EXISTS audit_event_append_only ON audit_auditevent;
DROP FUNCTION IF EXISTS audit_event_append_only();
"""


class Migration(migrations.Migration):
    initial = True

    dependencies = [migrations.swappable_dependency(settings.AUTH_USER_MODEL)]

    operations = [
        migrations.CreateModel(
            name="AuditEvent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("created_at", models.DateTimeField(db_index=True, default=django.utils.timezone.now, editable=False)),
                ("kind", models.CharField(choices=[
                    ("login", "sign-in"), ("login_failed", "failed sign-in"), ("locked_out", "sign-in locked out"),
                    ("signup", "sign-up"), ("admin_created", "first admin created (setup token)"),
                    ("api_key_created", "API key created"), ("api_key_revoked", "API key revoked"),
                    ("ban", "user banned"), ("unban", "user unbanned"), ("review_flag", "review flag raised"),
                    ("admin_change", "admin change"), ("moderation_block", "moderation block"),
                    ("conversation_read", "staff read a conversation"),
                ], db_index=True, max_length=32)),
                ("actor_name", models.CharField(blank=True, max_length=150)),
                ("target_name", models.CharField(blank=True, max_length=150)),
                ("ip", models.GenericIPAddressField(blank=True, null=True)),
                ("summary", models.CharField(max_length=300)),
                ("data", models.JSONField(blank=True, default=dict)),
                ("actor", models.ForeignKey(
                    blank=True, help_text="who did it (empty: anonymous or the system)", null=True,
                    on_delete=django.db.models.deletion.SET_NULL, related_name="+", to=settings.AUTH_USER_MODEL)),
                ("target_user", models.ForeignKey(
                    blank=True, help_text="whose account, key, conversation or text it concerns", null=True,
                    on_delete=django.db.models.deletion.SET_NULL, related_name="+", to=settings.AUTH_USER_MODEL)),
            ],
            options={
                "ordering": ["-created_at"],
                "indexes": [models.Index(fields=["target_user", "-created_at"], name="audit_target_newest")],
            },
        ),
        migrations.RunSQL(TRIGGER, DROP_TRIGGER),
    ]
