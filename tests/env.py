"""Loaded with `-p tests.env`, before pytest-django imports the settings.

Tests never touch a developer's data: every run gets a fresh DATA_DIR (its
own embedded Postgres cluster and Redis), unless DATABASE_URL / REDIS_URL
point at external servers. The converted SmolLM2 is shared across runs
through MODELS_DIR, because converting it takes ~20 s, and so is the native
kernels' library (ENGINE_KERNEL_DIR), whose build takes 13-15 s.
"""
import os
import signal
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

os.environ["DATA_DIR"] = tempfile.mkdtemp(prefix="chatapp-test-")
os.environ.setdefault("MODELS_DIR", str(ROOT / "var" / "models"))
# Every serve a test starts has a fresh DATA_DIR, and each built the library
# again (its name is keyed by its sources, torch and the CPU, so sharing it is safe).
os.environ.setdefault("ENGINE_KERNEL_DIR", str(ROOT / "var" / "kernels"))
os.environ.setdefault("LOAD_MODELS", "0")
os.environ.setdefault("DEBUG", "0")
# The product's default, "auto", times the number formats at every engine
# start (seconds, and its choice depends on the machine's load); tests that
# start a real serve pin fp32, the exact format. inference's own tests cover "auto".
os.environ.setdefault("ENGINE_DTYPE", "float32")
# Background tasks run inline in tests reach no developer's running server.
os.environ.setdefault("SERVE_URL", "http://127.0.0.1:9")
# Moderation runs its rules only: the model checkers are scored by
# `python -m bench.safety`, tests/safety switches them on where it tests
# them, and other suites' made-up prompts are not what those suites test.
os.environ.setdefault("SAFETY_CHECKERS", "safety.checkers.RulesChecker")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# A run ended by SIGTERM (`timeout`, a CI job cancelled) tears down as a
# Ctrl-C does: the session fixtures stop the embedded Postgres and Redis,
# which otherwise outlive the run (found: two clusters left by `timeout 600`).
signal.signal(signal.SIGTERM, _interrupt)
