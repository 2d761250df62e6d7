"""Configuration: env vars fail loudly, and production settings pass `check --deploy`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRODUCTION_ENV = {
    "DEBUG": "0",
    "HTTPS": "1",
    "SECRET_KEY": "k3P9-x1VZq8rT0m2LwYbN7cF5sJ4hD6gU_aE-oRiQyXzW1vB8nM3kH5tP0lS2jC9",
    "ALLOWED_HOSTS": "chat.example.com",
    "SECURE_HSTS_PRELOAD": "1",
}


def _clean_environ():
    # The browser fixtures set DJANGO_ALLOW_ASYNC_UNSAFE for this process;
    # a production `manage.py` must not inherit it (check --deploy flags it).
    return {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}


def manage(*args, **env):
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env={**_clean_environ(), **env}, capture_output=True, text=True, timeout=120,
    )


def test_check_deploy_is_clean_under_production_settings():
    result = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_flags_development_settings():
    result = manage("check", "--deploy", "--fail-level", "WARNING", DEBUG="1")
    assert result.returncode != 0
    assert "DEBUG" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DEBUG", "maybe", "DEBUG='maybe' is not a boolean"),
        ("ENGINE_MAX_NUM_SEQS", "many", "ENGINE_MAX_NUM_SEQS='many' is not an integer"),
        ("ENGINE_MAX_NUM_SEQS", "0", "ENGINE_MAX_NUM_SEQS=0 must be >= 1"),
        ("ENGINE_DEVICE", "tpu", "ENGINE_DEVICE='tpu' must be one of"),
        ("MODEL_POOLS_JSON", "{not json", "MODEL_POOLS_JSON is not valid JSON"),
        ("DB_POOL_MAX_SIZE", "-1", "DB_POOL_MAX_SIZE=-1 must be >= 0"),
        ("ENGINE_SMALL_LINEAR_ROWS", "65", "ENGINE_SMALL_LINEAR_ROWS=65 must be <= 64"),
        ("ENGINE_GIL_SWITCH_INTERVAL_MS", "fast", "ENGINE_GIL_SWITCH_INTERVAL_MS='fast' is not a number"),
        ("GATEWAY_API_RATE_PER_USER", "600 per minute", "GATEWAY_API_RATE_PER_USER='600 per minute' is not a rate"),
        ("CHAT_RATE_PER_IP", "30/w", "CHAT_RATE_PER_IP='30/w' is not a rate"),
        ("EMBEDDING_DTYPE", "float16", "EMBEDDING_DTYPE='float16' must be one of"),
        ("GATEWAY_BACKENDS_JSON", '{"gpu": {"base_url": "http://gpu:8000/v1", "self_hosted": "yes"}}',
         "'self_hosted' must be true or false"),
    ],
)
def test_bad_env_values_fail_loudly(name, value, message):
    result = manage("check", **{name: value})
    assert result.returncode != 0
    assert message in result.stderr


def test_debug_is_off_by_default():
    from django.conf import settings

    assert settings.DEBUG is False


def test_secret_key_is_generated_once_per_data_dir(tmp_path):
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "DATA_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "chatapp.settings"},
    )
    first, second = run(), run()
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.strip()) >= 50
    assert first.stdout == second.stdout
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_createsuperuser_noinput_works():
    # Runs against the (non-test) database of this run's temporary DATA_DIR.
    assert manage("migrate", "--noinput").returncode == 0
    result = manage(
        "createsuperuser", "--noinput",
        DJANGO_SUPERUSER_USERNAME="ops", DJANGO_SUPERUSER_PASSWORD="ops-pass-1234",
        DJANGO_SUPERUSER_EMAIL="ops@example.com",
    )
    assert result.returncode == 0, result.stderr
    check = manage(
        "shell", "-c",
        "from django.contrib.auth.models import User; u = User.objects.get(username='ops'); "
        "print(u.is_superuser, u.check_password('ops-pass-1234'))",
    )
    assert check.stdout.strip().splitlines()[-1] == "True True", check.stderr


@pytest.mark.django_db(transaction=True)
def test_closing_a_connection_returns_it_to_the_pool(settings):
    """What a request does at its end (close) keeps the backend for the next one."""
    from django.db import connection

    assert connection.pool is not None and connection.pool.max_size == settings.DB_POOL_MAX_SIZE

    def backend_pid():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]

    backend_pid()
    connection.close()
    opened = connection.pool.get_stats().get("connections_num", 0)
    pids = set()
    for _ in range(8):
        pids.add(backend_pid())
        connection.close()
    # Reused, not reconnected (the pool hands out its warm ones in turn).
    assert connection.pool.get_stats().get("connections_num", 0) == opened
    assert len(pids) <= connection.pool.get_stats()["pool_size"]


def test_starting_an_engine_shortens_the_gil_switch_interval_never_lengthens_it(settings, tmp_path):
    import sys

    from chatapp import runtime

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        settings.ENGINE_GIL_SWITCH_INTERVAL_MS = 0.5
        # Starting any pool applies it (here one whose model is missing, so nothing loads).
        settings.MODEL_POOLS = {"broken": {**settings.ENGINE_DEFAULTS, "model": str(tmp_path / "no-model")}}
        with pytest.raises(Exception):
            runtime.start_engine("broken")
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        settings.ENGINE_GIL_SWITCH_INTERVAL_MS = 2  # longer than now: left alone
        runtime.share_the_gil_with_engines()
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        sys.setswitchinterval(0.005)
        settings.ENGINE_GIL_SWITCH_INTERVAL_MS = 0  # off
        runtime.share_the_gil_with_engines()
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(before)
        runtime._engine_errors.pop("broken", None)


def test_the_engines_kernel_settings_reach_its_config(settings):
    from chatapp import runtime

    spec = settings.MODEL_POOLS["small"]
    for values in ((True, 2, True), (False, 0, False), (True, 0, False), (False, 5, True)):
        settings.ENGINE_ATTENTION_KERNEL, settings.ENGINE_SMALL_LINEAR_ROWS, settings.ENGINE_FUSED_OPS = values
        config = runtime.engine_config(spec)
        assert (config.attention_kernel, config.small_linear_rows, config.fused_ops) == values


def model_settings(**env) -> list[str]:
    """DEFAULT_POOL and EMBEDDING_THREADS as a process with this environment reads them."""
    result = manage("shell", "-c", "from django.conf import settings; "
                    "print('->', settings.DEFAULT_POOL, settings.EMBEDDING_THREADS)", **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("->")[-1].split()


def test_a_relay_node_defaults_to_its_first_backend_and_gives_moderation_its_cores():
    cores = len(os.sched_getaffinity(0))
    backends = '{"vllm": {"base_url": "http://10.0.0.5:8000/v1"}, "tgi": {"base_url": "http://10.0.0.6/v1"}}'
    assert model_settings(GATEWAY_BACKENDS_JSON=backends) == ["small", "1"]
    assert model_settings(MODEL_POOLS_JSON="{}", GATEWAY_BACKENDS_JSON=backends) == ["vllm", str(cores)]
    assert model_settings(MODEL_POOLS_JSON="{}", GATEWAY_BACKENDS_JSON=backends, EMBEDDING_THREADS="1",
                          DEFAULT_POOL="tgi") == ["tgi", "1"]


def test_web_processes_share_a_relay_nodes_cores_and_are_refused_beside_a_local_pool():
    cores = len(os.sched_getaffinity(0))
    backends = '{"vllm": {"base_url": "http://10.0.0.5:8000/v1"}}'
    assert model_settings(MODEL_POOLS_JSON="{}", GATEWAY_BACKENDS_JSON=backends, WEB_PROCESSES="2") == [
        "vllm", str(max(1, cores // 2))]
    assert model_settings(MODEL_POOLS_JSON="{}", GATEWAY_BACKENDS_JSON=backends, WEB_PROCESSES=str(cores * 4)) == [
        "vllm", "1"]
    # An engine's tokens reach only its own process's streams, and every
    # process would load its own copy of the model: refused, with the fix.
    result = manage("check", WEB_PROCESSES="2")
    assert result.returncode != 0
    assert "WEB_PROCESSES=2 needs a relay node: set MODEL_POOLS_JSON='{}'" in result.stderr
    assert "['small']" in result.stderr
    result = manage("check", WEB_PROCESSES="0", MODEL_POOLS_JSON="{}")
    assert result.returncode != 0
    assert "WEB_PROCESSES=0 must be >= 1" in result.stderr


def kernel_dir(**env) -> str:
    """ENGINE_KERNEL_DIR as a process with this environment reads it (empty
    counts as unset, so ENGINE_KERNEL_DIR="" drops the suite's own)."""
    result = manage("shell", "-c", "from django.conf import settings; print('->', settings.ENGINE_KERNEL_DIR)",
                    **{"ENGINE_KERNEL_DIR": "", **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.split("->")[-1].strip()


def test_the_kernels_folder_defaults_under_the_data_dir_and_can_be_shared(settings, tmp_path):
    """One built library for several data folders (the test suite's and the
    benchmarks' servers each start on a fresh DATA_DIR)."""
    from chatapp import runtime

    assert kernel_dir(DATA_DIR=str(tmp_path / "data")) == str((tmp_path / "data" / "kernels").resolve())
    assert kernel_dir(DATA_DIR=str(tmp_path / "data"), ENGINE_KERNEL_DIR=str(tmp_path / "shared")) == str(
        (tmp_path / "shared").resolve())
    settings.ENGINE_KERNEL_DIR = tmp_path / "shared"
    assert runtime.engine_config(settings.MODEL_POOLS["small"]).kernel_dir == str(tmp_path / "shared")


def printed_setting(name: str, **env) -> str:
    """A setting as a fresh process under `env` prints it, or what it wrote
    to stderr when the settings refused to load."""
    result = manage("shell", "-c", f"from django.conf import settings; print('->', settings.{name})", **env)
    return result.stdout.split("->")[-1].strip() if result.returncode == 0 else result.stderr


@pytest.mark.parametrize("name, field, default, below, above", [
    ("ENGINE_ARRIVAL_HOLD_MS", "arrival_hold_ms", "40.0", "-1", "5000"),
    ("ENGINE_STREAM_PACE_MS", "stream_pace_ms", "300.0", "-5", "1500"),
])
def test_engine_millisecond_settings_default_bounded_and_reach_the_engines_config(
        settings, name, field, default, below, above):
    from chatapp import runtime

    assert printed_setting(name) == default and printed_setting(name, **{name: "0"}) == "0.0"
    assert f"{name}={float(below)} must be >= 0.0" in printed_setting(name, **{name: below})
    assert f"{name}={float(above)} must be at most 1000" in printed_setting(name, **{name: above})
    assert f"{name}='soon' is not a number" in printed_setting(name, **{name: "soon"})
    setattr(settings, name, 25.0)
    assert getattr(runtime.engine_config(settings.MODEL_POOLS["small"]), field) == 25.0


def test_the_embedding_batches_wait_for_an_engine_thread_at_most_a_second():
    name = "EMBEDDING_ENGINE_THREAD_WAIT_MS"
    assert printed_setting(name) == "50" and printed_setting(name, **{name: "0"}) == "0"
    assert f"{name}=-1 must be >= 0" in printed_setting(name, **{name: "-1"})
    assert f"{name}=5000 must be <= 1000" in printed_setting(name, **{name: "5000"})
    assert f"{name}='soon' is not an integer" in printed_setting(name, **{name: "soon"})


def bf16_prompts_setting(**env) -> str:
    return printed_setting("ENGINE_BF16_PROMPTS", **env)


def test_bf16_prompts_are_auto_unless_set_and_reach_the_engines_config(settings):
    from chatapp import runtime

    assert bf16_prompts_setting() == "None"  # "auto": dtype auto decides at start
    assert bf16_prompts_setting(ENGINE_BF16_PROMPTS="false") == "False"
    assert bf16_prompts_setting(ENGINE_BF16_PROMPTS="true") == "True"
    assert "ENGINE_BF16_PROMPTS='yes' must be one of" in bf16_prompts_setting(ENGINE_BF16_PROMPTS="yes")
    settings.ENGINE_QUANTIZATION, settings.ENGINE_BF16_PROMPTS = "bf16_weight_only", True
    assert runtime.engine_config(settings.MODEL_POOLS["small"]).bf16_prompts is True
    # Asked for without the bf16 weights it needs: refused with a reason, not ignored.
    settings.ENGINE_QUANTIZATION = "none"
    with pytest.raises(ValueError, match="bf16_prompts needs quantization bf16_weight_only"):
        runtime.engine_config(settings.MODEL_POOLS["small"])
