"""The OpenAI wire format: request bodies (pydantic, strict JSON types), response bodies, error bodies.

Types are checked here (a string where a number belongs is a 400 naming the field); value ranges
(temperature >= 0, top_p in (0, 1], ...) are the engine's to check (SamplingParams.validate), so the
server and the batch CLI reject the same requests with the same words. Unknown fields are ignored,
as vLLM does; known OpenAI features afsplit does not have (n > 1, logprobs, echo, ...) are a 400.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

from afsplit.sampling_params import SamplingParams

Prompt = str | list[int] | list[str] | list[list[int]]


class ApiError(Exception):
    """An error answered with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's RequestValidationError.errors() -> a 400 naming the first bad field."""
    e = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
    # a union's failed branch shows up in loc as the branch type ('str', 'list[int]'): keep field names only
    loc = [p for p in loc if not (p[:1].islower() and ("[" in p or p in ("str", "int", "float", "bool")))]
    param = ".".join(loc) or None
    return ApiError(400, f"{param}: {e['msg']}" if param else e["msg"], param=param)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """The fields every generation request shares (OpenAI's, plus vLLM's top_k / ignore_eos / stop_token_ids)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    return_token_ids: bool = False  # vLLM's: choices carry the generated token ids (and prompt_token_ids)

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(400, f"n: only n=1 is supported, got {self.n}; send several requests instead", param="n")
        if self.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs: not supported by afsplit", param="logprobs")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed with stream: true", param="stream_options")
        if any(not s for s in self.stop_strings()):
            raise ApiError(400, "stop: stop strings must not be empty", param="stop")

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters; max_tokens None means 'up to max_model_len' (filled in by the engine loop)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              max_tokens=self.max_tokens, stop_token_ids=list(self.stop_token_ids or []),
                              ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, off in (("echo", False), ("suffix", None)):
            if getattr(self, name) != off:
                raise ApiError(400, f"{name}: not supported by afsplit", param=name)
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of: only 1 is supported", param="best_of")

    def prompts(self) -> list:
        """One engine prompt (text, or {'prompt_token_ids': [...]}) per prompt of the request."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            p = [p]
        elif not p:
            p = [[]]  # an empty token list: the engine names the problem (empty prompt)
        return [{"prompt_token_ids": x} if isinstance(x, list) else x for x in p]


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self, i: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise ApiError(400, f"messages[{i}].content: only text parts are supported, got {bad[0]!r}",
                           param=f"messages.{i}.content")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    add_generation_prompt: bool = True  # vLLM's: end the rendered prompt with the assistant's turn header
    top_logprobs: int | None = None

    def conversation(self) -> list[dict]:
        if not self.messages:
            raise ApiError(400, "messages: give at least one message", param="messages")
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    def sampling_params(self) -> SamplingParams:
        params = super().sampling_params()
        if self.max_completion_tokens is not None:
            params.max_tokens = self.max_completion_tokens
        return params


# -- responses -----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: Literal["text_completion", "chat.completion", "chat.completion.chunk"], rid: str, model: str,
             created: int, choices: list, usage_: dict | None = None) -> dict:
    out = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def model_card(name: str, max_model_len: int, root: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "afsplit", "root": root,
            "max_model_len": max_model_len}
