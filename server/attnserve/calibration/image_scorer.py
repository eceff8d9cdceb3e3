"""Head sets -> mean objective over prompts, on the diffusers engine (HeadHunter's score).

Each head set becomes one GenerateImage request per prompt (prompt i with seed `seed + i`, the
same for every head set) with SoftPAG on the set's heads, validated by the API's own input
processing and denoised by the engine's worker, which batches waiting requests of one size (up to
its max_batch_size) exactly as it does when serving. The objective scores the images the server
would return (decoded from its PNG bytes), a head set as soon as its images are in.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from attnserve_client.v1 import image_generation_pb2 as ipb
from attnserve_client.v1 import intervention_pb2
from PIL import Image

from ..api.image_inputs import to_image_request
from ..engines.base import GeneratedImages, ImageGeneration
from ..models.registry import ServedModel
from .headhunter import HeadSet, heads_by_layer
from .image_objectives import ImageObjective, scores_of


@dataclass(frozen=True)
class ImageSettings:
    """How every image of the search is generated."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    #: PAG scale s of the perturbed branch.
    pag_scale: float
    #: SoftPAG's u on the heads searched: (1 - u) A + u I.
    u: float
    #: Prompt i is generated from seed `seed + i`.
    seed: int


@dataclass
class ScoringProgress:
    """Of one call: images generated and head sets scored, of their totals."""

    images: int
    total_images: int
    head_sets: int
    total_head_sets: int


def soft_perturbation(head_set: HeadSet, u: float) -> ipb.SoftPerturbation:
    """SoftPAG on the heads of head_set."""
    heads = [
        intervention_pb2.LayerHeads(layer=layer, heads=hs) for layer, hs in heads_by_layer(head_set).items()
    ]
    return ipb.SoftPerturbation(heads=heads, u=u)


class HeadSetScorer:
    """Scores head sets by the mean objective over the prompts of their SoftPAG images."""

    def __init__(
        self,
        model: ServedModel,
        prompts: Sequence[str],
        settings: ImageSettings,
        objective: ImageObjective,
        loop: asyncio.AbstractEventLoop,
        on_progress: Callable[[str, ScoringProgress], None] = lambda description, progress: None,
    ):
        if not isinstance(model.engine, ImageGeneration):
            raise TypeError(f"model {model.name!r} does not generate images")
        self._model = model
        self._prompts = list(prompts)
        self._settings = settings
        self._objective = objective
        self._loop = loop
        self._on_progress = on_progress

    def request(self, head_set: HeadSet, prompt_index: int) -> ipb.GenerateImageRequest:
        """The GenerateImage request of one prompt with SoftPAG on head_set (none when empty)."""
        s = self._settings
        request = ipb.GenerateImageRequest(
            model=self._model.name,
            prompt=self._prompts[prompt_index],
            width=s.width,
            height=s.height,
            steps=s.steps,
            guidance_scale=s.guidance_scale,
            seed=s.seed + prompt_index,
            num_images=1,
        )
        if head_set:
            request.pag.CopyFrom(
                ipb.PerturbedAttentionGuidance(scale=s.pag_scale, soft=soft_perturbation(head_set, s.u))
            )
        return request

    def __call__(self, description: str, head_sets: Sequence[HeadSet]) -> list[float]:
        """Each head set's mean objective over the prompts. Raises spec.errors.InvalidRequest
        when a request is invalid (a prompt too long for the text encoder, say)."""
        return self._loop.run_until_complete(self._score(description, head_sets))

    async def _score(self, description: str, head_sets: Sequence[HeadSet]) -> list[float]:
        requests = [
            [
                to_image_request(self.request(head_set, i), self._model, self._model.engine)
                for i in range(len(self._prompts))
            ]
            for head_set in head_sets
        ]
        progress = ScoringProgress(0, len(head_sets) * len(self._prompts), 0, len(head_sets))
        self._on_progress(description, progress)

        async def image(request) -> Image.Image:
            async for event in self._model.engine.generate_image(request):
                if isinstance(event, GeneratedImages):
                    [png] = event.png
            progress.images += 1
            self._on_progress(description, progress)
            return Image.open(io.BytesIO(png)).convert("RGB")

        async def mean_score(set_requests) -> float:
            images = await asyncio.gather(*(image(request) for request in set_requests))
            scores = scores_of(self._objective, list(images), self._prompts)
            progress.head_sets += 1
            self._on_progress(description, progress)
            return sum(scores) / len(scores)

        # Every request waits in the engine at once, in order: its worker batches them.
        tasks = [asyncio.ensure_future(mean_score(set_requests)) for set_requests in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # on a failure, the requests still waiting leave the engine
            for task in tasks:
                task.cancel()
