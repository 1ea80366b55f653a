"""The engine loop: one thread drives the engine core; the asyncio side talks to it through queues.

The engine is not thread-safe, so everything that touches it — validating and tokenizing a request,
adding it, aborting it, stepping — happens on this thread, as in vLLM's AsyncLLM. Requests and
aborts reach it through a queue; each step's token updates go back to the asyncio loop in one
``call_soon_threadsafe`` callback and from there into each request's :class:`RequestHandle`.
Requests that arrive while a step runs join the running batch at the next step.

While no request is in flight, the thread waits on its queue; in the distributed layout it sends
the other ranks an idle plan every ``keepalive_s`` so their control-plane waits never reach
``comm.timeout_s``. A step that raises (a rank died, a peer went silent) is fatal: every open
request gets a 500, ``on_fatal`` is called with one line naming this rank, and the thread ends.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time

from afsplit.errors import RequestError
from afsplit.sequence import SeqUpdate
from afsplit.server.engine_core import Load, thread_device
from afsplit.server.protocol import ApiError

log = logging.getLogger("afsplit.server")

STOP_FLUSH_STEPS = 16  # steps allowed, when stopping, to carry the last aborts to every rank


class RequestHandle:
    """One HTTP request's engine requests (one per prompt) and the queue their updates arrive on."""

    def __init__(self, owner: "EngineLoop", num_prompts: int):
        self.owner = owner
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.time()
        self.num_prompts = num_prompts
        self.request_ids: list[int] = []
        self.prompt_token_ids: list[list[int]] = []
        self.last_time: dict[int, float] = {}  # request id -> time of its latest token

    async def next_updates(self) -> list[SeqUpdate]:
        """Every update that has arrived, waiting for at least one (a group of tokens becomes one chunk)."""
        items = [await self.queue.get()]
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        for item in items:
            if isinstance(item, BaseException):
                raise item
        return items

    def finish(self, index: int, reason: str) -> None:
        """The caller ended choice `index` itself (a stop string): abort its engine request."""
        self.owner.abort(self, [self.request_ids[index]], reason)

    def close(self) -> None:
        """Abort whatever is still running (the client left, or the response is done)."""
        self.owner.abort(self, self.request_ids, "abort")


class EngineLoop:
    def __init__(self, core, metrics, max_waiting: int = 0, keepalive_s: float = 5.0, on_fatal=None):
        self.core = core
        self.engine = core.engine
        self.max_model_len = self.engine.max_model_len
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.keepalive_s = keepalive_s
        self.on_fatal = on_fatal
        self.inbox: queue.Queue = queue.Queue()
        self._select_device = thread_device(core.device)  # here, on the thread that built the engine
        self.fatal: str | None = None
        self.fatal_error: BaseException | None = None
        self.accepting = True
        self.load = Load(kv_total_blocks=self.engine.kv.allocator.num_blocks)
        # asyncio-thread state
        self.handles: dict[int, RequestHandle] = {}  # engine request id -> its handle, until it finishes
        self.num_live = 0  # requests accepted (or being validated) and not finished
        self._validating: set[asyncio.Future] = set()  # submissions the engine thread has not answered yet
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        # engine-thread state
        self._in_engine: set[int] = set()

    # -- asyncio side ------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="afsplit-engine", daemon=True)
        self.thread.start()

    @property
    def num_waiting(self) -> int:
        return max(0, self.num_live - self.load.running)

    async def submit(self, prompts: list, params) -> RequestHandle:
        """Validate and queue one HTTP request's prompts; raises ApiError (400 bad input, 429 full queue)."""
        if not self.accepting or self.fatal:
            raise ApiError(503, "the server is shutting down", type="server_error")
        if self.max_waiting and self.num_waiting + len(prompts) > self.max_waiting:
            raise ApiError(429, f"{self.num_waiting} requests are waiting (--max-waiting {self.max_waiting}); "
                                "retry later", type="rate_limit_error", code="rate_limit_exceeded")
        handle = RequestHandle(self, len(prompts))
        self.num_live += len(prompts)
        done = self.loop.create_future()
        self._validating.add(done)
        self.inbox.put(("add", prompts, params, handle, done))
        await done  # if cancelled (client gone), _on_added aborts the requests once they exist
        return handle

    def abort(self, handle: RequestHandle, request_ids: list[int], reason: str) -> None:
        ids = [rid for rid in request_ids if self.handles.get(rid) is handle]
        for rid in ids:
            self._retire(rid)
            if reason != "abort" and handle.last_time.get(rid):  # a stop string: the request is complete
                self.metrics.e2e.observe(handle.last_time[rid] - handle.arrival)
            self.metrics.finished(reason)
        if ids:
            self.inbox.put(("abort", ids))

    def stop(self) -> None:
        """Refuse new requests, abort the rest, stop the other ranks; returns when the thread has ended."""
        self.accepting = False
        self.inbox.put(("stop",))
        if self.thread is not None:
            self.thread.join()

    def _retire(self, rid: int) -> None:
        if self.handles.pop(rid, None) is not None:
            self.num_live -= 1

    def _on_added(self, handle: RequestHandle, done: asyncio.Future, result) -> None:
        self._validating.discard(done)
        if isinstance(result, Exception):
            self.num_live -= handle.num_prompts
            if not done.cancelled():
                done.set_exception(result)
            return
        for rid, ids in result:
            self.handles[rid] = handle
            handle.request_ids.append(rid)
            handle.prompt_token_ids.append(ids)
            self.metrics.prompt_tokens.inc(len(ids))
        if done.cancelled():
            handle.close()
        else:
            done.set_result(None)

    def _on_step(self, updates: list[SeqUpdate]) -> None:
        m = self.metrics
        for upd in updates:
            handle = self.handles.get(upd.request_id)
            if handle is None:  # aborted meanwhile
                continue
            if upd.new_token_ids:
                m.generation_tokens.inc(len(upd.new_token_ids))
                last = handle.last_time.get(upd.request_id)
                if last is None:
                    m.ttft.observe(upd.time - handle.arrival)
                else:
                    m.itl.observe((upd.time - last) / len(upd.new_token_ids))
                handle.last_time[upd.request_id] = upd.time
            handle.queue.put_nowait(upd)
            if upd.finish_reason:
                self._retire(upd.request_id)
                m.e2e.observe(upd.time - handle.arrival)
                m.finished(upd.finish_reason)

    def _on_fatal(self, message: str) -> None:
        for handle in set(self.handles.values()):
            handle.queue.put_nowait(ApiError(500, message, type="server_error"))
        self.handles.clear()
        for done in self._validating:  # never reached the engine thread
            if not done.done():
                done.set_exception(ApiError(500, message, type="server_error"))
        self._validating.clear()
        if self.on_fatal is not None:
            self.on_fatal(message)

    def _post(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        core = self.core.core
        last_plan = time.monotonic()
        try:
            self._select_device()
            while True:
                busy = core.has_unfinished_requests()
                commands = self._take(block=not busy, timeout=max(0.0, self.keepalive_s - (time.monotonic() - last_plan)))
                if any(c[0] == "stop" for c in commands):
                    self._stop(core)
                    return
                for c in commands:
                    self._command(core, c)
                if core.has_unfinished_requests():
                    updates = core.step()
                    last_plan = time.monotonic()
                    self.metrics.observe_exchange(self.core.take_exchange_seconds())
                    self.metrics.observe_failovers(self.core.take_failovers())
                    for upd in updates:
                        if upd.finish_reason:
                            self._in_engine.discard(upd.request_id)
                    self._publish_load()
                    self._post(self._on_step, updates)
                else:
                    self._publish_load()
                    if time.monotonic() - last_plan >= self.keepalive_s:
                        self.core.keepalive()
                        last_plan = time.monotonic()
        except Exception as e:  # noqa: BLE001 -- a failed step ends the server with one line
            rank = getattr(getattr(self.core, "runtime", None), "rank", None)
            self.fatal = f"rank {rank}: {e}" if rank is not None else str(e)
            self.fatal_error = e  # the serving rank re-raises it: the launcher's one line names the failed rank
            log.debug("engine loop failed", exc_info=True)
            self._post(self._on_fatal, self.fatal)

    def _take(self, block: bool, timeout: float) -> list:
        out = []
        if block:
            try:
                out.append(self.inbox.get(timeout=timeout))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self.inbox.get_nowait())
            except queue.Empty:
                return out

    def _command(self, core, c) -> None:
        if c[0] == "abort":
            for rid in c[1]:
                if rid in self._in_engine:
                    self._in_engine.discard(rid)
                    core.abort_request(rid)
            return
        _, prompts, params, handle, done = c
        try:
            seqs = [self._make_sequence(p, params) for p in prompts]
        except RequestError as e:
            self._post(self._on_added, handle, done, ApiError(400, str(e)))
            return
        for seq in seqs:
            core.add_sequence(seq)
            self._in_engine.add(seq.request_id)
        self._post(self._on_added, handle, done, [(s.request_id, s.prompt_token_ids) for s in seqs])

    def _make_sequence(self, prompt, params):
        """The engine validates; a missing max_tokens means 'up to max_model_len' (chat's default)."""
        _, ids = self.engine.tokenize(prompt)
        params = copy.copy(params)
        if params.max_tokens is None:
            params.max_tokens = max(1, self.max_model_len - len(ids))
        return self.engine.make_sequence({"prompt_token_ids": ids}, params)

    def _publish_load(self) -> None:
        self.load = self.core.load()
        self.metrics.set_load(self.load)

    def _stop(self, core) -> None:
        for rid in self._in_engine:
            core.abort_request(rid)
        for _ in range(STOP_FLUSH_STEPS):
            if not core.has_unfinished_requests():
                break
            core.step()
        self.core.close()
