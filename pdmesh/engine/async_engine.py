"""``AsyncEngine``: an ``LLMEngine`` on its own thread, driven from asyncio.

Lifecycle
---------
1. ``start()`` builds the engine on the engine thread (model load never blocks the event loop).
   On CUDA the thread's current device is the engine's device first: a new thread starts on
   ``cuda:0``, and anything that takes the current device (event records, Triton launches, pinned
   copies' streams) would otherwise run on GPU 0 for a worker on GPU 1.
2. The thread loops: run queued commands (add, abort, admit, start a pull, release, ...) in
   order, then one ``step()`` if there is work (it polls KV pulls in flight first), then hand
   that step's outputs to the loop with a single ``call_soon_threadsafe``.  While idle it sleeps
   on a condition variable — but while KV pulls are in flight and nothing else is to be done, it
   only waits ``TRANSFER_POLL_S`` before polling them again (a pull that lands starts decoding
   within that, not at the next command); the same for copies to and from the lower KV tiers.
3. ``shutdown()`` stops the loop after the current step; pending callers get ``EngineDeadError``;
   the engine then closes (a tensor-parallel engine stops its other ranks).  ``fail(why)`` ends
   every pending caller and stream at once from the loop, for a worker that must stop although the
   engine thread may be stuck (a rank died inside a collective).

All engine state is touched only on the engine thread; asyncio callers go through ``call()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Optional

import torch

from pdmesh.engine.engine import EngineStats, LLMEngine
from pdmesh.engine.sequence import RequestOutput, SamplingParams

log = logging.getLogger(__name__)

TRANSFER_POLL_S = 0.0005
"""Longest wait of an otherwise idle engine thread between polls of KV pulls in flight."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown or a fatal error)."""


class RequestAborted(RuntimeError):
    """Raised by a request's output stream when ``abort()`` ended the request: the stream ends
    with an error instead of waiting forever for outputs that will never come."""


class AsyncEngine:
    def __init__(self, factory: Callable[[], LLMEngine], device: Optional[torch.device] = None) -> None:
        self._factory = factory
        self._device = device
        """The engine's device: the engine thread's current CUDA device (None or CPU: untouched)."""
        self._cmds: deque[tuple[Callable[[LLMEngine], Any], Optional[asyncio.Future]]] = deque()
        self._cv = threading.Condition()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._error: Optional[BaseException] = None
        self.engine: Optional[LLMEngine] = None
        self.stats: Optional[EngineStats] = None
        """Snapshot after the latest step (read-only for other threads)."""
        self.on_step: Optional[Callable[[list[RequestOutput], float, str], None]] = None
        """Called on the loop thread with each step's outputs, its duration (s) and its kind
        (``LLMEngine.last_step_kind``) (metrics hook)."""

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future = self._loop.create_future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="engine", daemon=True)
        self._thread.start()
        await ready

    def _resolve(self, fut: Optional[asyncio.Future], value: Any = None, exc: Optional[BaseException] = None) -> None:
        if fut is None or self._loop is None:
            return

        def settle() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

        self._loop.call_soon_threadsafe(settle)

    def _main(self, ready: asyncio.Future) -> None:
        try:
            if self._device is not None and self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            self.engine = self._factory()
            self.stats = self.engine.stats()
        except BaseException as exc:  # noqa: BLE001 - reported to the starter
            self._error = exc
            self._resolve(ready, exc=exc)
            return
        self._resolve(ready, True)
        eng = self.engine
        while True:
            with self._cv:
                while not self._cmds and not eng.has_work() and not self._stop:
                    if eng.transfers_pending():
                        self._cv.wait(TRANSFER_POLL_S)
                        break
                    self._cv.wait()
                if self._stop:
                    if eng.tiers is not None:  # a graceful stop: the host tier's blocks go to disk
                        try:
                            eng.tiers.flush(eng.poll_transfers, eng.config.cache.kv_offload_flush_seconds)
                        except Exception:  # noqa: BLE001 - a flush is best effort
                            log.exception("writing the host KV tier to disk at shutdown failed")
                    break
                cmds = list(self._cmds)
                self._cmds.clear()
            for fn, fut in cmds:
                try:
                    self._resolve(fut, fn(eng))
                except BaseException as exc:  # noqa: BLE001 - returned to the caller
                    self._resolve(fut, exc=exc)
            if eng.has_work():
                t0 = time.perf_counter()
                try:
                    outputs = eng.step()
                except BaseException as exc:  # noqa: BLE001 - fatal: fail everyone
                    log.exception("engine step failed")
                    self._error = exc
                    break
                dt = time.perf_counter() - t0
                self.stats = eng.stats()
                if outputs and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs, dt, eng.last_step_kind)
            else:
                try:
                    eng.poll_transfers()
                except BaseException as exc:  # noqa: BLE001 - fatal: fail everyone
                    log.exception("KV transfer poll failed")
                    self._error = exc
                    break
                self.stats = eng.stats()
        self._fail_all()
        try:
            eng.close()
        except Exception:  # noqa: BLE001 - stopping anyway
            log.exception("closing the engine failed")

    def _fail_all(self) -> None:
        err = EngineDeadError(f"engine stopped: {self._error!r}" if self._error else "engine stopped")
        with self._cv:
            cmds = list(self._cmds)
            self._cmds.clear()
        for _, fut in cmds:
            self._resolve(fut, exc=err)
        if self._loop is not None:
            def close_streams() -> None:
                for q in self._streams.values():
                    q.put_nowait(err)
            self._loop.call_soon_threadsafe(close_streams)

    def _dispatch(self, outputs: list[RequestOutput], dt: float, kind: str) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        if self.on_step is not None:
            self.on_step(outputs, dt, kind)

    # ------------------------------------------------------------------ API (event loop)
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def error(self) -> Optional[BaseException]:
        """Why the engine thread stopped (None while it runs or after a clean shutdown)."""
        return self._error

    def fail(self, why: str) -> None:
        """Loop thread: the engine can serve no more (``why``): every pending call and open stream
        ends with ``EngineDeadError`` now, whatever the engine thread is doing; new calls are refused."""
        if self._error is None:
            self._error = EngineDeadError(why)
        with self._cv:
            self._stop = True
            self._cv.notify()
        err = EngineDeadError(f"engine stopped: {why}")
        with self._cv:
            cmds = list(self._cmds)
            self._cmds.clear()
        for _, fut in cmds:
            if fut is not None and not fut.done():
                fut.set_exception(err)
        for q in self._streams.values():
            q.put_nowait(err)

    def call_nowait(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Queue ``fn(engine)`` without waiting for it (used from finally blocks)."""
        with self._cv:
            self._cmds.append((fn, None))
            self._cv.notify()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread, between steps; return its result."""
        if not self.alive:
            raise EngineDeadError(f"engine is not running ({self._error!r})")
        fut = asyncio.get_running_loop().create_future()
        with self._cv:
            self._cmds.append((fn, fut))
            self._cv.notify()
        return await fut

    def open_stream(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def iterate_batches(self, request_id: str, q: asyncio.Queue, idle: Optional[float] = None
                              ) -> AsyncIterator[list[RequestOutput]]:
        """Outputs of a request until it finishes, as lists: whatever steps finished while the
        consumer was busy arrive together (one message per batch downstream, not per token).
        With ``idle``, an empty list comes whenever nothing arrived for ``idle`` seconds (the
        consumer's cue to tell its peer that the request is alive).  If the consumer stops early
        (cancellation, error), the request is aborted."""
        finished = False
        try:
            while not finished:
                if idle is not None and q.empty():
                    try:
                        async with asyncio.timeout(idle):
                            first = await q.get()
                    except TimeoutError:
                        yield []
                        continue
                else:
                    first = await q.get()
                batch = [first]
                while not q.empty():
                    batch.append(q.get_nowait())
                for item in batch:
                    if isinstance(item, BaseException):
                        raise item
                finished = batch[-1].finished
                yield batch
        finally:
            self.close_stream(request_id)
            if not finished:
                self.call_nowait(lambda e: e.abort(request_id))

    async def iterate(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        async for batch in self.iterate_batches(request_id, q):
            for out in batch:
                yield out

    async def prepare(self, params: SamplingParams) -> None:
        """Work a request needs before it joins the batch, done off the engine thread so that steps
        never wait for it: compiling its grammar (cached by the engine).  RequestRejected if invalid."""
        eng = self.engine
        if params.grammar is not None and eng is not None:
            await asyncio.to_thread(eng.compile_grammar, params.grammar)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       prefill_only: bool = False) -> AsyncIterator[RequestOutput]:
        await self.prepare(params)
        q = self.open_stream(request_id)
        try:
            await self.call(lambda e: e.add_request(request_id, prompt_ids, params, prefill_only))
        except BaseException:
            self.close_stream(request_id)
            # Cancelled while queued: the add may still run; the abort queued after it undoes it.
            self.call_nowait(lambda e: e.abort(request_id))
            raise
        async for out in self.iterate(request_id, q):
            yield out

    async def abort(self, request_id: str) -> bool:
        """Abort the request; its open output stream, if any, ends with ``RequestAborted``."""
        found = await self.call(lambda e: e.abort(request_id))
        q = self._streams.get(request_id)
        if found and q is not None:
            q.put_nowait(RequestAborted(f"request {request_id!r} was aborted"))
        return found

    async def shutdown(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
