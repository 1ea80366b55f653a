"""Incremental detokenisation for streaming: text deltas that never split a UTF-8 character.

A byte-level tokenizer can put half of a multi-byte character into one token; decoding the tokens
seen so far then ends in U+FFFD. We decode a short window (the tokens since the last emitted
delta, plus the few before them as context, so decoders that depend on a token's left neighbour
— leading-space rules — give the same text as a full decode) and emit the new text only once it
no longer ends in U+FFFD; `flush` emits whatever is left when the request ends.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context_ids: list[int] = ()):
        """`context_ids`: tokens before the output (the prompt's tail) that the first deltas decode against."""
        self.tokenizer = tokenizer
        self.ids = list(context_ids[-4:])
        if tokenizer is not None and self._decode(self.ids).endswith(REPLACEMENT):
            self.ids = []  # the prompt ends inside a character: its completion belongs to the output's text
        self.prefix = 0  # ids[prefix:read] were already emitted (kept as context)
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; the text they complete (possibly empty while a character is unfinished)."""
        if self.tokenizer is None:
            return ""
        self.ids += new_ids
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """The text not emitted yet (an unfinished character comes out as U+FFFD, as a full decode gives)."""
        if self.tokenizer is None or self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
