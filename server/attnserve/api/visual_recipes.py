"""Visual recipes: CARVE and Visual Funnel, run by the server for one Generate request.

A recipe is a few ordinary engine requests (passes) built from the client's request: reading
passes whose image_attention readout (per layer, the mean over heads) the recipe turns into crops
of the image with the math of attention/carve.py and attention/visual_funnel.py, then the final
pass, the client's question asked about the image and its crops, whose tokens are the response's.
Only readouts are used, so every engine that serves a VLM runs the recipes. Every pass is built
and validated here before any runs: the final one with the image standing in for its crops (an
image is always the same number of tokens), so a recipe that cannot fit fails up front.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2, visual_recipe_pb2
from PIL import Image

from ..attention import carve, visual_funnel
from ..engines.base import EngineRequest, TokenOutput
from ..models.registry import ServedModel
from ..readouts.image_attention import ImageAttention
from ..spec.errors import FieldViolation, InvalidRequest, Violations
from ..spec.ranges import ranged_value
from ..spec.selectors import selected_layers
from .images import encode_png
from .inputs import to_engine_request

#: Tokens each reading pass generates by default (the authors' max_new_tokens).
PASS_MAX_TOKENS = 32
MAX_COMPONENTS = 1000
MAX_GENERAL_QUERY = 1000


@dataclass(frozen=True)
class CarveSettings:
    general_query: str
    layers: tuple[int, ...]
    top_fraction: float
    min_components: int


@dataclass(frozen=True)
class FunnelSettings:
    layers: tuple[int, ...]
    crops: int
    smallest_crop: float
    largest_crop: float


@dataclass
class RecipeOutcome:
    """What the passes found, filled in while the recipe runs."""

    passes: int = 0
    #: Prompt and generated tokens of the reading passes (the final pass is the request's own).
    reading_prompt_tokens: int = 0
    reading_tokens: int = 0
    first_answer: str = ""
    #: ((left, top, right, bottom), PNG) per crop fed back.
    crops: list[tuple[tuple[int, int, int, int], bytes]] = field(default_factory=list)
    mask_png: bytes = b""
    attention_entropy: float = 0.0

    def to_proto(self) -> visual_recipe_pb2.VisualRecipeResult:
        return visual_recipe_pb2.VisualRecipeResult(
            passes=self.passes,
            first_answer=self.first_answer,
            crops=[
                visual_recipe_pb2.ImageCrop(left=b[0], top=b[1], right=b[2], bottom=b[3], png=png)
                for b, png in self.crops
            ],
            mask_png=self.mask_png,
            attention_entropy=self.attention_entropy,
        )


@dataclass
class VisualRecipe:
    """One request's recipe: its validated passes. generate() runs them and yields the final
    pass's tokens; final_request is the final pass as run (its images the crops)."""

    settings: CarveSettings | FunnelSettings
    image: Image.Image
    #: The question about the image alone; CARVE's general query about it.
    question: EngineRequest
    general: EngineRequest | None
    final_request: EngineRequest
    max_image_pixels: int
    outcome: RecipeOutcome = field(default_factory=RecipeOutcome)

    @property
    def reading_passes(self) -> list[EngineRequest]:
        """The passes run before the final one: the question, and CARVE's general query."""
        return [self.question] + ([self.general] if self.general else [])

    async def generate(self, engine) -> AsyncIterator[TokenOutput]:
        # 1. The reading passes, submitted together so that they share batches; one failing (or
        # the call cancelled) cancels the other.
        readings = self.reading_passes
        tasks = [asyncio.ensure_future(_collect(engine, r)) for r in readings]
        try:
            answers = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        self.outcome.passes = len(readings) + 1
        self.outcome.reading_prompt_tokens = sum(len(r.prompt_token_ids) for r in readings)
        self.outcome.reading_tokens = sum(len(outputs) for outputs in answers)
        self.outcome.first_answer = "".join(out.text for out in answers[0])
        layers = self.settings.layers
        # 2. The crops, from the passes' attention, off the event loop (pixel work).
        if isinstance(self.settings, CarveSettings):
            maps = (_layer_maps(answers[0], layers), _layer_maps(answers[1], layers))
            crops = await asyncio.to_thread(self._carve, *maps)
        else:
            crops = await asyncio.to_thread(self._funnel, _layer_maps(answers[0], layers))
        # 3. The final pass: the question about the image and its crops.
        self.final_request = dataclasses.replace(self.final_request, images=(self.image, *crops))
        async for out in engine.generate(self.final_request):
            yield out

    def _carve(self, query_maps: torch.Tensor, general_maps: torch.Tensor) -> list[Image.Image]:
        s = self.settings
        left, top, right, bottom = seen_square(self.image.size)
        scores = carve.contrast_map(query_maps, general_maps, (bottom - top, right - left))
        kept = carve.keep_components(
            scores, carve.top_fraction_mask(scores, s.top_fraction), s.top_fraction, s.min_components
        )
        mask = np.zeros((self.image.height, self.image.width), dtype=bool)
        mask[top:bottom, left:right] = kept.numpy()
        box = carve.mask_box(torch.from_numpy(mask))
        masked = Image.fromarray(np.asarray(self.image) * mask[:, :, None])
        crop = self._upscaled(masked.crop(box))
        self.outcome.mask_png = encode_png(Image.fromarray(mask.astype(np.uint8) * 255))
        self.outcome.crops = [(box, encode_png(crop))]
        return [crop]

    def _funnel(self, maps: torch.Tensor) -> list[Image.Image]:
        s = self.settings
        distribution = visual_funnel.patch_distribution(maps)
        entropy = visual_funnel.normalised_entropy(distribution)
        centre = visual_funnel.anchor(distribution)
        fractions = visual_funnel.crop_fractions(entropy, s.crops, s.smallest_crop, s.largest_crop)
        square = seen_square(self.image.size)
        crops = []
        for fraction in fractions:
            box = visual_funnel.crop_box(centre, fraction, square, self.image.size)
            crop = self._upscaled(self.image.crop(box))
            self.outcome.crops.append((box, encode_png(crop)))
            crops.append(crop)
        self.outcome.attention_entropy = entropy
        return crops

    def _upscaled(self, crop: Image.Image) -> Image.Image:
        """The crop scaled (Lanczos) to cover the image's size, as CARVE does, within the
        model's image pixel limit."""
        width, height = crop.size
        cover = max(self.image.width / width, self.image.height / height)
        scale = min(cover, math.sqrt(self.max_image_pixels / (width * height)))
        if scale <= 1:
            return crop
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        return crop.resize(size, Image.Resampling.LANCZOS)


def seen_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The part of an image (width, height) the vision tower sees: CLIP's processing resizes the
    shorter side and centre-crops a square. (left, top, right, bottom)."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_visual_recipe(request: pb.GenerateRequest, model: ServedModel) -> VisualRecipe:
    """The request's recipe with every pass validated; InvalidRequest names the bad field."""
    kind = request.WhichOneof("visual_recipe")
    if not model.engine.info.runs_visual_recipes:
        reason = (
            "is not a vision-language model; recipes read images"
            if model.engine.info.vision is None
            else "cannot read image attention, which recipes need"
        )
        raise InvalidRequest([FieldViolation(kind, f"model {model.name!r} {reason}")])
    plain = _without_recipe(request)
    original = to_engine_request(plain, model)  # the client's fields, with their own names
    violations = Violations()
    if len(original.images) != 1:
        violations.add(
            "chat", f"a visual recipe reads exactly one image (the chat has {len(original.images)})"
        )
    geometry = model.engine.info.geometry
    max_tokens = model.limits.max_tokens
    spec = getattr(request, kind)
    layers = tuple(layer.index for layer in selected_layers(spec.layers, [], kind, geometry, violations))
    pass_max_tokens = spec.pass_max_tokens if spec.HasField("pass_max_tokens") else PASS_MAX_TOKENS
    if not 1 <= pass_max_tokens <= max_tokens:
        violations.add(f"{kind}.pass_max_tokens", f"must be in [1, {max_tokens}] (got {pass_max_tokens})")
    if kind == "carve":
        settings = _carve_settings(spec, layers, geometry.num_layers, violations)
        crops = 1
    else:
        settings = _funnel_settings(spec, layers, geometry.num_layers, violations)
        crops = settings.crops
    if 1 + crops > model.limits.max_images:
        field_name = f"{kind}.crops" if kind == "visual_funnel" else kind
        violations.add(
            field_name,
            f"the final pass holds the image and {crops} crop(s), more than the model's "
            f"max_images of {model.limits.max_images}",
        )
    violations.raise_if_any()

    image_at = _image_part(request)
    reading = readout_pb2.ReadoutSpec(
        image_attention=readout_pb2.ImageAttentionSpec(layers=settings.layers, per_layer=True)
    )
    question = _reading_pass(plain, reading, pass_max_tokens)
    general = None
    if isinstance(settings, CarveSettings):
        general = _reading_pass(plain, reading, pass_max_tokens)
        _ask_instead(general, image_at, settings.general_query)
    final = pb.GenerateRequest()
    final.CopyFrom(plain)
    image_bytes = final.chat.messages[image_at[0]].parts[image_at[1]].image
    _add_images(final, image_at, [image_bytes] * crops)  # the image stands in for its crops
    base_id = original.request_id
    return VisualRecipe(
        settings=settings,
        image=original.images[0],
        question=_pass(question, model, kind, "question pass", f"{base_id}-question"),
        general=_pass(general, model, kind, "general pass", f"{base_id}-general") if general else None,
        final_request=_pass(final, model, kind, "final pass", base_id),
        max_image_pixels=model.limits.max_image_pixels,
    )


def _carve_settings(spec, layers, num_layers: int, violations: Violations) -> CarveSettings:
    general_query = spec.general_query or carve.GENERAL_QUERY
    if not general_query.strip() or len(general_query) > MAX_GENERAL_QUERY:
        violations.add("carve.general_query", f"must hold some text, at most {MAX_GENERAL_QUERY} characters")
    top_fraction = ranged_value(
        spec, "top_fraction", carve.TOP_FRACTION, "carve.top_fraction", "carve", violations
    )
    min_components = spec.min_components if spec.HasField("min_components") else carve.MIN_COMPONENTS
    if not 1 <= min_components <= MAX_COMPONENTS:
        violations.add("carve.min_components", f"must be in [1, {MAX_COMPONENTS}] (got {min_components})")
    return CarveSettings(
        general_query=general_query,
        layers=layers or tuple(carve.default_layers(num_layers)),
        top_fraction=top_fraction,
        min_components=min_components,
    )


def _funnel_settings(spec, layers, num_layers: int, violations: Violations) -> FunnelSettings:
    field_name = "visual_funnel"
    crops = spec.crops if spec.HasField("crops") else visual_funnel.CROPS
    if crops < 1:
        violations.add(f"{field_name}.crops", f"must be at least 1 (got {crops})")
    smallest = ranged_value(
        spec,
        "smallest_crop",
        visual_funnel.SMALLEST_CROP,
        "visual_funnel.smallest_crop",
        field_name,
        violations,
    )
    largest = ranged_value(
        spec, "largest_crop", visual_funnel.LARGEST_CROP, "visual_funnel.largest_crop", field_name, violations
    )
    if smallest > largest:
        violations.add(
            f"{field_name}.largest_crop", f"must be at least smallest_crop ({largest:g} < {smallest:g})"
        )
    return FunnelSettings(
        layers=layers or tuple(carve.default_layers(num_layers)),
        crops=crops,
        smallest_crop=smallest,
        largest_crop=largest,
    )


def _without_recipe(request: pb.GenerateRequest) -> pb.GenerateRequest:
    plain = pb.GenerateRequest()
    plain.CopyFrom(request)
    plain.ClearField(plain.WhichOneof("visual_recipe"))
    return plain


def _image_part(request: pb.GenerateRequest) -> tuple[int, int]:
    """(message, part) of the chat's image."""
    for m, message in enumerate(request.chat.messages):
        for p, part in enumerate(message.parts):
            if part.WhichOneof("part") == "image":
                return m, p
    raise AssertionError("the request was checked to hold one image")


def _reading_pass(plain: pb.GenerateRequest, readouts, max_tokens: int) -> pb.GenerateRequest:
    """The question about the image alone, greedy, reading the image attention; no interventions."""
    reading = pb.GenerateRequest(model=plain.model, chat=plain.chat, readouts=readouts)
    reading.sampling.max_tokens = max_tokens
    return reading


def _ask_instead(request: pb.GenerateRequest, image_at: tuple[int, int], text: str) -> None:
    """The image's message keeps its image and says text instead of its own text."""
    message = request.chat.messages[image_at[0]]
    image = message.parts[image_at[1]].image
    del message.parts[:]
    message.parts.add(image=image)
    message.parts.add(text=text)


def _add_images(request: pb.GenerateRequest, image_at: tuple[int, int], images: Sequence[bytes]) -> None:
    """The images inserted right after the chat's image, in order."""
    message = request.chat.messages[image_at[0]]
    parts = list(message.parts)
    added = [pb.ContentPart(image=data) for data in images]
    del message.parts[:]
    message.parts.extend(parts[: image_at[1] + 1] + added + parts[image_at[1] + 1 :])


def _pass(
    request: pb.GenerateRequest, model: ServedModel, kind: str, name: str, request_id: str
) -> EngineRequest:
    """The pass as an engine request; its violations are the recipe's (the client's own fields
    were checked on the client's request)."""
    try:
        engine_request = to_engine_request(request, model)
    except InvalidRequest as exc:
        raise InvalidRequest(
            [FieldViolation(kind, f"the recipe's {name}: {v.field}: {v.description}") for v in exc.violations]
        ) from None
    return dataclasses.replace(engine_request, request_id=request_id)


async def _collect(engine, request: EngineRequest) -> list[TokenOutput]:
    return [out async for out in engine.generate(request)]


def _layer_maps(outputs: Sequence[TokenOutput], layers: Sequence[int]) -> torch.Tensor:
    """(steps, layers, grid, grid): each step's per-layer head-mean map over the image's patches."""
    steps = []
    for out in outputs:
        maps = out.step_readouts[ImageAttention.name].maps
        steps.append([maps[(0, layer, None)] for layer in layers])
    values = torch.tensor(steps, dtype=torch.float32)
    grid = math.isqrt(values.shape[-1])
    return values.reshape(len(outputs), len(layers), grid, grid)
