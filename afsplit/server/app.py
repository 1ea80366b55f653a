"""The routes: /health, /v1/models, /v1/completions, /v1/chat/completions, /metrics.

A generation request is validated (types here, values by the engine), queued on the engine loop,
then answered either as one JSON body or as Server-Sent Events: one ``data: {...}`` chunk per group
of new tokens that completed some text, then (with ``stream_options.include_usage``) a usage chunk,
then ``data: [DONE]``. A client that goes away mid-request has its engine requests aborted. Every
error is OpenAI's error body with its status (400 bad input, 404 unknown model or route, 429 full
queue, 500 engine failure, 503 shutting down).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from afsplit.errors import RequestError
from afsplit.server import protocol as P
from afsplit.server.chat_template import ChatTemplate
from afsplit.server.engine_loop import EngineLoop, RequestHandle
from afsplit.server.metrics import ServerMetrics
from afsplit.server.output import ChoiceOutput

log = logging.getLogger("afsplit.server")


@dataclass
class ServerState:
    loop: EngineLoop
    metrics: ServerMetrics
    model_name: str
    model_root: str
    tokenizer: object  # tokenizers.Tokenizer or None (token ids in and out only)
    chat_template: ChatTemplate | None


# -- response shapes -----------------------------------------------------------------------------


class CompletionShape:
    final_kind = chunk_kind = "text_completion"
    prefix = "cmpl"

    @staticmethod
    def final(c: ChoiceOutput) -> dict:
        return {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}

    @staticmethod
    def delta(index: int, text: str, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    first_chunk = None


class ChatShape:
    final_kind, chunk_kind = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"

    @staticmethod
    def final(c: ChoiceOutput) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish_reason}

    @staticmethod
    def delta(index: int, text: str, finish: str | None) -> dict:
        return {"index": index, "delta": {"content": text} if text or finish is None else {}, "logprobs": None,
                "finish_reason": finish}

    @staticmethod
    def first_chunk(index: int) -> dict:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


class Generation:
    """One HTTP request's choices, fed from its engine handle."""

    def __init__(self, state: ServerState, handle: RequestHandle, body: P._SamplingFields, shape):
        self.handle, self.shape, self.body = handle, shape, body
        self.model = state.model_name
        self.id, self.created = P.new_id(shape.prefix), int(time.time())
        self.choices = [ChoiceOutput(i, state.tokenizer, ids, body.stop_strings())
                        for i, ids in enumerate(handle.prompt_token_ids)]
        self._by_rid = dict(zip(handle.request_ids, self.choices))
        # without text to show (no tokenizer) or when asked for ids, every token group is a chunk
        self.every_group = state.tokenizer is None or body.return_token_ids

    async def groups(self):
        """Yield the choices that changed, as (choice, new text, new ids), until every choice has finished."""
        while not all(c.finished for c in self.choices):
            touched = {}
            for upd in await self.handle.next_updates():
                c = self._by_rid[upd.request_id]
                was = c.finished
                c.add(upd)
                if c.stopped_by_string and not was:
                    self.handle.finish(c.index, "stop")
                if not was:
                    touched[c.index] = c
            yield [(c, *c.take()) for c in touched.values()]

    def usage(self) -> dict:
        return P.usage(sum(c.prompt_tokens for c in self.choices), sum(len(c.token_ids) for c in self.choices))

    def envelope(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        return P.envelope(kind, self.id, self.model, self.created, choices, usage)

    def _with_ids(self, choice: dict, c: ChoiceOutput, ids: list[int], first: bool) -> dict:
        if self.body.return_token_ids:
            choice["token_ids"] = ids
            if first:
                choice["prompt_token_ids"] = c.prompt_token_ids
        return choice

    async def final_body(self) -> dict:
        async for _ in self.groups():
            pass
        choices = [self._with_ids(self.shape.final(c), c, c.token_ids, True) for c in self.choices]
        return self.envelope(self.shape.final_kind, choices, self.usage())

    async def sse(self):
        started = set()
        try:
            if self.shape.first_chunk is not None:
                yield _sse(self.envelope(self.shape.chunk_kind, [self.shape.first_chunk(c.index) for c in self.choices]))
            async for group in self.groups():
                out = []
                for c, text, ids in group:
                    finish = c.finish_reason if c.finished else None
                    if text or finish or (self.every_group and ids):
                        out.append(self._with_ids(self.shape.delta(c.index, text, finish), c, ids, c.index not in started))
                        started.add(c.index)
                if out:
                    yield _sse(self.envelope(self.shape.chunk_kind, out))
            if self.body.include_usage:
                yield _sse(self.envelope(self.shape.chunk_kind, [], self.usage()))
        except P.ApiError as e:  # the engine failed mid-stream: the error body as the last event
            yield _sse(e.body())
        finally:
            self.handle.close()
        yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the app ---------------------------------------------------------------------------------------


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        state.loop.start(asyncio.get_running_loop())
        yield
        state.loop.stop()

    app = FastAPI(title="afsplit", lifespan=lifespan)

    @app.exception_handler(P.ApiError)
    async def _api_error(_req, e: P.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        err = P.validation_error(e.errors())
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http(_req, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(P.error_body(str(e.detail), kind, code=None), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_req, e: Exception):
        log.exception("unexpected error")
        return JSONResponse(P.error_body(f"internal error: {e}", "server_error"), status_code=500)

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise P.ApiError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
                             param="model", code="model_not_found")

    async def respond(body: P._SamplingFields, prompts: list, request: Request, shape):
        handle = await state.loop.submit(prompts, body.sampling_params())
        gen = Generation(state, handle, body, shape)
        if body.stream:
            return StreamingResponse(gen.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = asyncio.ensure_future(gen.final_body())
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
            handle.close()
        if not result.done() or result.cancelled():
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(result.result())

    @app.get("/health")
    async def health():
        if state.loop.fatal or not state.loop.accepting:
            raise P.ApiError(503, state.loop.fatal or "shutting down", type="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [P.model_card(state.model_name, state.loop.max_model_len, state.model_root)]}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        check_model(body.model)
        body.check_supported()
        return await respond(body, body.prompts(), request, CompletionShape)

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatCompletionRequest, request: Request):
        check_model(body.model)
        body.check_supported()
        if state.chat_template is None:
            raise P.ApiError(400, f"{state.model_root or state.model_name} has no chat template "
                                  "(tokenizer_config.json 'chat_template' or chat_template.jinja); use /v1/completions")
        try:
            prompt = state.chat_template.render(body.conversation(), body.add_generation_prompt)
        except RequestError as e:
            raise P.ApiError(400, str(e), param="messages") from None
        return await respond(body, [prompt], request, ChatShape)

    @app.get("/metrics")
    async def metrics():
        state.metrics.set_waiting(state.loop.num_waiting)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return app
