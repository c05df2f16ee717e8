"""`AsyncEngine`: the engine on its own thread, with asyncio streams of outputs for servers.

NOTE: only the engine thread touches the `Engine` after `start()`. Coroutines hand it requests and
aborts through a locked inbox and get snapshots of their outputs on their own event loop, so a
model step never blocks the loop that serves HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Sequence

from .engine import Engine
from .engine_outputs import RequestOutput
from .errors import PgenError
from .sampling import SamplingParams

_IDLE_WAIT_S = 0.05


class EngineDeadError(PgenError):
    """The engine thread stopped on an error; the server cannot generate any more."""


class AsyncEngine:
    """Runs `engine.step()` in a loop on a thread while requests are queued.

    Args:
        engine: the engine to drive; do not call it directly once started.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: list[tuple] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.error: BaseException | None = None
        self.snapshot = self._snapshot()  # (KVMetrics, waiting, running) after the latest step

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pgen-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the thread and wait for it."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield snapshots of the request's output as tokens come, the last one finished.

        Raises:
            ShapeError, ConfigError: the request is invalid (raised before anything is queued).
            EngineDeadError: the engine thread failed.
        """
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error or 'stopped'})")
        ids = self.engine.encode(prompt)  # encode/check read only immutable engine settings
        self.engine.check(ids, params)
        request_id = request_id or f"async-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._post(("add", prompt, params, request_id))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    if item is not self.error:
                        raise item
                    raise EngineDeadError(f"the engine failed: {item!r}") from item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    def _post(self, message: tuple) -> None:
        with self._wake:
            self._inbox.append(message)
            self._wake.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    if not (self._inbox or self.engine.has_unfinished or self._stopping):
                        self._wake.wait(_IDLE_WAIT_S)
                    inbox, self._inbox = self._inbox, []
                    stopping = self._stopping
                for message in inbox:
                    self._handle(message)
                if inbox:
                    self.snapshot = self._snapshot()
                if stopping:
                    for request_id, req in list(self.engine.requests.items()):
                        self.engine.abort(request_id)
                        self._deliver(request_id, req.output.snapshot())
                    return
                if self.engine.has_unfinished:
                    for output in self.engine.step():
                        self._deliver(output.request_id, output.snapshot())
                    self.snapshot = self._snapshot()
        except BaseException as err:  # the thread must report, not vanish: every stream gets the error
            self.error = err
            for request_id in list(self._streams):
                self._deliver(request_id, err)

    def _snapshot(self) -> tuple:
        scheduler = self.engine.scheduler
        return self.engine.manager.metrics(), len(scheduler.waiting), len(scheduler.running)

    def _handle(self, message: tuple) -> None:
        if message[0] == "abort":
            self.engine.abort(message[1])
            return
        _, prompt, params, request_id = message
        try:
            self.engine.add_request(prompt, params, request_id)
        except PgenError as err:  # checked by the caller already; a race (duplicate id) lands here
            self._deliver(request_id, err)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop closed under a client that went away
                pass
