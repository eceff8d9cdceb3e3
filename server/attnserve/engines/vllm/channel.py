"""The side channel that carries readouts from vLLM's worker process to the server.

vLLM's own output path carries tokens only, so the worker pushes one StepMessage per forward
over a ZeroMQ PUSH socket (IPC) to a PULL socket the engine adapter binds. Both ends are
bounded: the worker never blocks (a full queue drops the message and logs it), and the server
keeps messages only for requests that are registered, so an aborted or finished request's
readouts are dropped on arrival instead of piling up.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from ...attention.readout import LayerStatistics
from ..readouts import StepReadouts

log = logging.getLogger("attnserve.engines.vllm.channel")

#: Messages queued per socket before the worker drops (send) or the kernel pushes back (receive).
HIGH_WATER_MARK = 1024


@dataclass
class StepMessage:
    """What one forward produced: (request key, step, step complete, readouts) per reporting
    request, and the statistics sampled for the metrics as (layer, statistics)."""

    requests: list[tuple[str, int, bool, StepReadouts]] = field(default_factory=list)
    sampled_statistics: list[tuple[int, LayerStatistics]] = field(default_factory=list)


class ReadoutPublisher:
    """The worker's end: a PUSH socket, connected on first use, that never blocks a forward."""

    def __init__(self, address: str):
        self._address = address
        self._socket: zmq.Socket | None = None
        self._dropped = 0

    def send(self, message: StepMessage) -> None:
        if self._socket is None:
            self._socket = zmq.Context.instance().socket(zmq.PUSH)
            self._socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self._address)
        try:
            self._socket.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), zmq.NOBLOCK)
        except zmq.Again:
            self._dropped += 1
            log.warning("readout channel full: dropped a step's readouts (%d so far)", self._dropped)


class RequestInbox:
    """One request's readouts as they arrive, step by step."""

    def __init__(self) -> None:
        self._steps: dict[int, StepReadouts] = {}
        self._complete: set[int] = set()
        self._arrived = asyncio.Event()

    def put(self, step: int, complete: bool, readouts: StepReadouts) -> None:
        if step in self._steps:
            self._steps[step].merge(readouts)
        else:
            self._steps[step] = readouts
        if complete:
            self._complete.add(step)
            self._arrived.set()

    async def take(self, step: int, timeout: float) -> StepReadouts | None:
        """The step's readouts once its last forward reported; None after timeout seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while step not in self._complete:
            self._arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return None
        self._complete.discard(step)
        return self._steps.pop(step)


class ReadoutChannel:
    """The server's end: a PULL socket read by a task on the event loop."""

    def __init__(self, address: str, on_statistics: Callable[[int, LayerStatistics], None] | None):
        self.address = address
        self._on_statistics = on_statistics
        self._inboxes: dict[str, RequestInbox] = {}
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._receive(), name="attnserve-readouts")

    def register(self, key: str) -> RequestInbox:
        inbox = self._inboxes[key] = RequestInbox()
        return inbox

    def unregister(self, key: str) -> None:
        self._inboxes.pop(key, None)

    @property
    def num_registered(self) -> int:
        return len(self._inboxes)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._socket.close()
        self._context.term()

    async def _receive(self) -> None:
        while True:
            data = await self._socket.recv()
            try:
                self._dispatch(pickle.loads(data))
            except Exception:  # a bad message must not stop the channel
                log.exception("could not handle a readout message")

    def _dispatch(self, message: StepMessage) -> None:
        if self._on_statistics is not None:
            for layer, stats in message.sampled_statistics:
                self._on_statistics(layer, stats)
        for key, step, complete, readouts in message.requests:
            inbox = self._inboxes.get(key)
            if inbox is not None:  # otherwise the request has gone: drop its readouts
                inbox.put(step, complete, readouts)
