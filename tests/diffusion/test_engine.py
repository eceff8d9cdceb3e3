"""The diffusers engine's scheduling: requests of one size and step count that wait together run
as one batch (one UNet call per step), each getting what it gets alone; other sizes wait for
their own batch; a closed stream leaves its batch."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import numpy as np
import pytest
from attnserve.engines.base import DenoisingProgress, GeneratedImages
from attnserve.engines.diffusers.engine import DiffusersEngine
from PIL import Image

from .helpers import image_request, pag


@pytest.fixture(scope="module")
async def engine(tiny_sd_path):
    steps_seen: list[float] = []
    engine = DiffusersEngine(tiny_sd_path, max_batch_size=4, on_step_seconds=steps_seen.append)
    engine.steps_seen = steps_seen
    await engine.start()
    yield engine
    await engine.shutdown()


async def run(engine, request, first_step: asyncio.Event | None = None):
    progress, images = [], None
    async for event in engine.generate_image(request):
        if isinstance(event, DenoisingProgress):
            progress.append(event.step)
            if first_step is not None:
                first_step.set()
        else:
            assert isinstance(event, GeneratedImages)
            images = [np.asarray(Image.open(io.BytesIO(png))) for png in event.png]
    return progress, images


async def test_waiting_requests_of_one_size_run_as_one_batch(engine, served):
    denoiser, geometry = served
    blocker = dataclasses.replace(image_request(denoiser, seed=9), width=48, steps=6)
    same_size = [
        image_request(denoiser, seed=1),
        image_request(denoiser, pag(geometry), seed=2, num_images=2),
    ]
    other_size = dataclasses.replace(image_request(denoiser, seed=3), height=16)
    alone = [await run(engine, request) for request in (*same_size, other_size)]

    engine.steps_seen.clear()
    started = asyncio.Event()
    blocking = asyncio.create_task(run(engine, blocker, started))
    await started.wait()  # the others arrive while the blocker runs, and wait together
    results = await asyncio.gather(*(run(engine, request) for request in (*same_size, other_size)))
    await blocking
    # 6 steps of the blocker, 3 of the same-size pair together, 3 of the other size.
    assert len(engine.steps_seen) == 6 + 3 + 3
    for (progress, images), (progress_alone, images_alone) in zip(results, alone):
        assert progress == progress_alone == [0, 1, 2]
        assert len(images) == len(images_alone)
        for image, image_alone in zip(images, images_alone):
            assert np.abs(image.astype(int) - image_alone.astype(int)).max() <= 1


async def test_a_closed_stream_leaves_its_batch(engine, served):
    denoiser, _ = served
    request = dataclasses.replace(image_request(denoiser), steps=40)
    engine.steps_seen.clear()
    stream = engine.generate_image(request)
    assert isinstance(await anext(stream), DenoisingProgress)
    await stream.aclose()
    # The engine is free again: a short request runs at once.
    progress, images = await asyncio.wait_for(run(engine, image_request(denoiser)), timeout=60)
    assert progress == [0, 1, 2] and len(images) == 1
    assert len(engine.steps_seen) < 40 + 3
    for _ in range(100):  # the worker clears its batch just after sending the last images
        if engine.num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.num_running == 0 and engine.num_waiting == 0
