"""The Celery app, and the rule that its worker never loads a model.

Model work (titles, summaries) goes to the serving process's API
(conversations.tasks says why). In a worker process torch cannot even be
imported, so no engine can be built: a task that reaches for one fails with
a message that says where model work belongs, instead of quietly loading a
second copy of the weights and the KV cache. The engine package itself stays
importable: its light surface (SamplingParams, its errors) imports no torch,
and the gateway's modules use it.
"""
import importlib.abc
import os
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


app = Celery("chatapp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
