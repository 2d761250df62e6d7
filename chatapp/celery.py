"""The Celery app, and the rule that its worker never loads a model.

Model work (titles, summaries) goes to the serving process's API
(conversations.tasks says why). In a worker process torch cannot even be
imported, so no engine can be built: a task that reaches for one fails with
a message that says where model work belongs, instead of quietly loading a
second copy of the weights and the KV cache. The engine package itself stays
importable: its light surface (SamplingParams, its errors) imports no torch,
and the gateway's modules use it.

A worker also exits with its parent (`exit_with_parent`): `serve` starts the
worker's main process that way, and the worker's pool processes and embedded
beat follow its main process, so a `serve` killed outright (SIGKILL, the
OOM killer) leaves no worker behind to run next to the next one's.
"""
import ctypes
import importlib.abc
import os
import signal
import sys

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")

MODEL_PACKAGES = ("torch",)


class NoModelsInTheWorker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in MODEL_PACKAGES:
            raise ModuleNotFoundError(
                f"{fullname} cannot be imported in the Celery worker: it never loads a model; "
                "model work goes to the serving process's API (see conversations.tasks)",
                name=fullname,
            )
        return None  # anything else: the next finder's business


# Connected before the app exists, so it runs before the Django fix-up's own
# receiver: the guard is in place before Django's apps and the task modules
# load, and whatever imports torch on a worker's start-up stops the worker
# with a traceback that names it. Only a worker (or beat) sends this signal.
@signals.import_modules.connect
def refuse_models_in_the_worker(**kwargs) -> None:
    loaded = [name for name in MODEL_PACKAGES if name in sys.modules]
    if loaded:
        raise RuntimeError(f"the Celery worker imported {loaded} before it started; it must hold no model")
    if not any(isinstance(finder, NoModelsInTheWorker) for finder in sys.meta_path):
        sys.meta_path.insert(0, NoModelsInTheWorker())


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send this process `sig` when its parent exits (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing, and `serve` stops a stale worker
    when it next starts). Safe as a Popen `preexec_fn`: it only calls prctl."""
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return  # not Linux
    prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)  # the parent went before prctl took effect


# A pool process holds nothing worth saving: an unfinished task's message is
# acknowledged late (conversations.tasks), so it stays in the broker.
@signals.worker_process_init.connect
def pool_process_exits_with_its_worker(**kwargs) -> None:
    exit_with_parent(signal.SIGKILL)


# Embedded beat saves its schedule on SIGTERM.
@signals.beat_embedded_init.connect
def beat_exits_with_its_worker(**kwargs) -> None:
    exit_with_parent(signal.SIGTERM)


app = Celery("chatapp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
