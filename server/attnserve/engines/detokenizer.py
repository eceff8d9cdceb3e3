"""Incremental detokenization with stop strings, shared by the engines."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas and detects stop strings.

    Decodes the whole generated sequence each step (exact for any tokenizer, cheap for the
    lengths served here) and holds back a tail that could still be the start of a stop string
    or an incomplete multi-byte character.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._token_ids: list[int] = []
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int, final: bool = False) -> str:
        """Add a token; return the new text to emit. Sets .stopped on a stop string."""
        self._token_ids.append(token_id)
        text = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        # The earliest occurrence of any stop string, so the kept text contains none of them.
        hits = [at for stop in self._stop if (at := text.find(stop, max(0, self._emitted - len(stop)))) != -1]
        if hits:
            text, final, self.stopped = text[: min(hits)], True, True
        self.text = text
        end = len(text) if final else len(text) - self._holdback
        if not final and text.endswith("\ufffd"):  # incomplete UTF-8 sequence
            end = min(end, len(text) - 1)
        if end <= self._emitted:
            return ""
        delta, self._emitted = text[self._emitted : end], end
        return delta

    def flush(self) -> str:
        """The held-back text, at the end of generation."""
        delta, self._emitted = self.text[self._emitted :], len(self.text)
        return delta
