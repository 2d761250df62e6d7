"""Memory's settings fail loudly on bad values, like every other setting."""
import pytest

from tests.test_settings import manage


@pytest.mark.parametrize(("name", "value", "message"), [
    ("MEMORY_CONTEXT_SHARE", "0.9", "MEMORY_CONTEXT_SHARE=0.9 must be at most 0.5"),
    ("MEMORY_MIN_SIMILARITY", "2", "MEMORY_MIN_SIMILARITY=2.0 must be between -1 and 1"),
    ("MEMORY_MAX_CHARS", "5", "MEMORY_MAX_CHARS=5 must be >= 20"),
    ("TEMPORARY_CHAT_TTL_S", "soon", "TEMPORARY_CHAT_TTL_S='soon' is not an integer"),
])
def test_bad_memory_settings_fail_loudly(name, value, message):
    result = manage("check", **{name: value})
    assert result.returncode != 0
    assert message in result.stderr
