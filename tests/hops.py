"""Counting a request's hops from the event loop to a thread."""


def thread_hops(monkeypatch) -> list[str]:
    """From now on, the name of what every `sync_to_async` call runs, in order:
    one entry per hop to a thread and back."""
    from asgiref.sync import SyncToAsync

    hops: list[str] = []
    real_call = SyncToAsync.__call__

    async def counting_call(self, *args, **kwargs):
        hops.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await real_call(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counting_call)
    return hops
