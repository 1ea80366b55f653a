"""One choice of a response: engine token updates -> text, stop strings, finish reason, token counts.

Streaming and non-streaming responses both read the text through :meth:`ChoiceOutput.take`, so a
streamed response's concatenated deltas are exactly the non-streamed text. While a stop string
could still be completed by the next tokens, the last ``len(longest stop) - 1`` characters are held
back; a stop string found ends the choice (finish_reason "stop", the stop string not included) and
the caller aborts the engine request, which frees its KV blocks at the next step.
"""

from __future__ import annotations

from afsplit.sequence import SeqUpdate
from afsplit.server.detokenizer import IncrementalDetokenizer


class ChoiceOutput:
    def __init__(self, index: int, tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self.index = index
        self.prompt_tokens = len(prompt_token_ids)
        self.prompt_token_ids = prompt_token_ids
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of text already taken
        self.token_ids: list[int] = []
        self.unsent_ids: list[int] = []  # token ids not yet taken (for return_token_ids)
        self.finish_reason: str | None = None
        self.stopped_by_string = False  # the engine request is still running: abort it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, upd: SeqUpdate) -> None:
        if self.finished:
            return
        self.token_ids += upd.new_token_ids
        self.unsent_ids += upd.new_token_ids
        new = self.detok.add(upd.new_token_ids)
        if upd.finish_reason:
            new += self.detok.flush()
        self._append(new)
        if not self.finished and upd.finish_reason:
            self.finish_reason = upd.finish_reason

    def _append(self, new: str) -> None:
        if not new:
            return
        start = max(0, len(self.text) - self.hold)  # a stop string completed by `new` starts here or later
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
            self.stopped_by_string = True

    def take(self) -> tuple[str, list[int]]:
        """(text, token ids) that are final and not taken yet."""
        end = len(self.text) if self.finished else max(self.sent, len(self.text) - self.hold)
        text, self.sent = self.text[self.sent:end], end
        ids, self.unsent_ids = self.unsent_ids, []
        return text, ids
