"""Writes for conversations and messages (filled in by the chat issue)."""


def reap_orphaned_replies() -> int:
    """Mark replies left `streaming` by a dead process as `interrupted`.

    Called by `serve` before it accepts requests. Returns how many replies
    were marked; with no Message model yet there is nothing to reap.
    """
    return 0
