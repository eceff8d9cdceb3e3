"""Calibration on the vLLM engine (`attnserve calibrate --engine vllm`): the serving engine class,
started in this process, scores each search round's answers as the Score RPC does on it
(VllmEngine.score_answers: every row of the round submitted at once, vLLM batching up to
batch_size of them per step). The search is synchronous; the engine lives on an event loop in
another thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..engines.hf.scoring import AnswerQuery
from ..engines.vllm.engine import VllmEngine
from ..models.config import VllmSettings
from .objective import Scorer


class VllmScorer(Scorer):
    """Scores on a started VllmEngine whose event loop runs in another thread (on_scored is
    called there); the engine's tokenizer and geometry are the model's."""

    def __init__(self, engine: VllmEngine, loop: asyncio.AbstractEventLoop, batch_size: int):
        self.engine = engine
        self._loop = loop
        self.batch_size = batch_size

    def score(self, queries: Sequence[AnswerQuery], on_scored: Callable[[int], None]) -> list[float]:
        return asyncio.run_coroutine_threadsafe(
            self.engine.score_answers(queries, on_scored), self._loop
        ).result()


@contextlib.contextmanager
def vllm_scorer(
    model_path: Path,
    *,
    dtype: str,
    device: str,
    batch_size: int,
    settings: VllmSettings,
    cache_dir: Path | None,
) -> Iterator[VllmScorer]:
    """A VllmScorer on an engine started for the block (vLLM's own processes end with it)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="vllm-scorer-loop", daemon=True)
    thread.start()

    def wait(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    engine = VllmEngine(
        model_path,
        dtype=dtype,
        device=device,
        max_batch_size=batch_size,
        settings=settings,
        cache_dir=cache_dir,
    )
    try:
        wait(engine.start())
        yield VllmScorer(engine, loop, batch_size)
    finally:
        wait(engine.shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
