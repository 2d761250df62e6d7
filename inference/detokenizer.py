"""Incremental detokenization and stop strings.

Text is released only when it is final: a token that ends inside a multi-byte
character decodes to U+FFFD and waits for the next one, and the tail that
could still become a stop string is held back until it no longer can.
"""
from __future__ import annotations

# Prompt tokens decoded ahead of the output so tokenizers that drop a leading
# space at the start of a string (SentencePiece) still space the first word.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Per token, the work is bounded by the stop strings' length, never by the
    output's: only the text not yet released is kept (at most the longest stop
    string once released), and a stop string is searched for only where the
    new text could complete it."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        # Output text not yet released (cut at a matched stop string). Released
        # text never holds the start of a stop string (release holds it back),
        # so a match always starts here.
        self.pending = ""
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.stop_starts = {s[0] for s in stop}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string it completed, if any."""
        if self.tokenizer is None:
            return None
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None  # nothing printable yet (a split character or a special token)
        delta = after[len(before):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        # Only the new text and the few characters before it can complete a match.
        window_start = max(0, len(self.pending) - self.max_stop_len + 1)
        self.pending += delta
        if not self.stop:
            return None
        best = None
        for stop in self.stop:
            index = self.pending.find(stop, window_start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self.pending = self.pending[:best[0]]
        return best[1]

    def release(self, final: bool = False) -> str:
        """Text that is now safe to show (all of it when final)."""
        end = len(self.pending)
        if not final and self.stop:
            end -= self._held_back()
        out, self.pending = self.pending[:end], self.pending[end:]
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        text = self.pending
        for start in range(max(0, len(text) - self.max_stop_len + 1), len(text)):
            if text[start] in self.stop_starts:
                suffix = text[start:]
                if any(stop.startswith(suffix) for stop in self.stop):
                    return len(text) - start
        return 0
