"""Input processing of GenerateImage: the request proto becomes a validated ImageRequest with its
prompts tokenized for the text encoder. Every check runs here, before anything reaches a model;
violations name the proto field."""

from __future__ import annotations

import uuid

from attnserve_client.v1 import image_generation_pb2 as pb
from attnserve_client.v1 import intervention_pb2

from ..engines.base import ImageGeneration, ImageRequest
from ..models.registry import ServedModel
from ..readouts.word_heatmaps import compile_content_style, compile_words
from ..spec.compile import SpecContext, SpecLimits, compile_plan
from ..spec.errors import FieldViolation, InvalidRequest, Violations
from ..spec.geometry import AttentionKind
from ..spec.guidance import compile_guidance
from ..spec.layout import compile_layout, with_layout
from ..spec.ranges import PARAMETER_RANGES
from ..spec.words import word_positions
from .inputs import MAX_REQUEST_ID_LENGTH

#: The attention kinds where image tokens attend to text tokens (word heatmaps read them).
_TEXT_KINDS = (AttentionKind.CROSS, AttentionKind.JOINT)
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5


def to_image_request(
    request: pb.GenerateImageRequest, model: ServedModel, engine: ImageGeneration
) -> ImageRequest:
    violations = Violations()
    limits = model.limits
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        violations.add("request_id", f"at most {MAX_REQUEST_ID_LENGTH} characters")
    if not request.prompt.strip():
        violations.add("prompt", "must not be empty")
    prompt_ids = _text_token_ids(request.prompt, "prompt", engine, violations)
    negative_ids = _text_token_ids(request.negative_prompt, "negative_prompt", engine, violations)
    multiple, largest = engine.size_multiple, limits.max_image_size
    width = _side(request.width, "width", engine.default_size[1], multiple, largest, violations)
    height = _side(request.height, "height", engine.default_size[0], multiple, largest, violations)
    steps = request.steps or DEFAULT_STEPS
    if not 1 <= steps <= limits.max_denoising_steps:
        violations.add("steps", f"must be in [1, {limits.max_denoising_steps}] (got {steps})")
    num_images = request.num_images or 1
    if not 1 <= num_images <= limits.max_generated_images:
        violations.add("num_images", f"must be in [1, {limits.max_generated_images}] (got {num_images})")
    guidance_scale = request.guidance_scale if request.HasField("guidance_scale") else DEFAULT_GUIDANCE_SCALE
    allowed = PARAMETER_RANGES["guidance_scale"]
    if guidance_scale not in allowed:
        violations.add("guidance_scale", f"{allowed.describe()} (got {guidance_scale:g})")
    _check_key_selectors(request, violations)
    geometry = engine.info.geometry
    presets = {name: list(p.interventions) for name, p in model.presets.items()}
    perturbed = (
        compile_guidance(request.pag, "pag", geometry, violations, presets)
        if request.HasField("pag")
        else None
    )
    words = compile_words(
        request.word_heatmaps,
        prompt_ids,
        engine.tokenizer,
        num_images * width * height,
        limits.max_readout_values,
        violations,
    )
    content_style = compile_content_style(request.word_heatmaps, prompt_ids, engine.tokenizer, violations)

    def positions_of(word: str) -> tuple[int, ...]:
        return word_positions(word, prompt_ids, engine.tokenizer)

    layout_ops = compile_layout(
        request.layout, engine.query_grids(height, width), len(prompt_ids), positions_of, violations
    )
    violations.raise_if_any()

    plan = compile_plan(
        request.interventions,
        request.readouts,
        SpecContext(
            geometry=geometry,
            limits=SpecLimits(limits.max_interventions, limits.max_readout_values),
            presets=presets,
            prompt_tokens=len(prompt_ids),
            max_tokens=steps,
            supported_operations=engine.info.supported_operations,
            supported_readouts=engine.info.supported_readouts,
            unsupported_reason=engine.info.unsupported_reason,
            word_positions=positions_of,
        ),
    )
    plan = with_layout(plan, layout_ops)
    if (words or content_style) and any(
        geometry.layers[layer].kind in _TEXT_KINDS for layer in plan.layer_ops
    ):
        raise InvalidRequest(
            [
                FieldViolation(
                    "word_heatmaps",
                    "heatmaps read the unedited attention of image tokens over text tokens: not "
                    "with interventions on cross-attention (or a DiT's joint attention) layers or a layout",
                )
            ]
        )
    return ImageRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt_ids),
        negative_token_ids=tuple(negative_ids),
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=request.seed if request.HasField("seed") else None,
        num_images=num_images,
        plan=plan,
        perturbed=perturbed,
        heatmap_words=words,
        content_style=content_style,
    )


def _check_key_selectors(request: pb.GenerateImageRequest, violations: Violations) -> None:
    """Key ranges are text-token positions: only cross-attention (a UNet's) and joint attention (a
    DiT's, where they are the text keys) have text keys."""
    text_kinds = (intervention_pb2.ATTENTION_KIND_CROSS, intervention_pb2.ATTENTION_KIND_JOINT)
    for i, intervention in enumerate(request.interventions.interventions):
        selector = intervention.selector
        if selector.HasField("keys") and selector.attention not in text_kinds:
            violations.add(
                f"interventions.interventions[{i}].selector.attention",
                "keys select prompt tokens, which only cross-attention and joint attention layers "
                "attend to: set attention to ATTENTION_KIND_CROSS (a UNet) or ATTENTION_KIND_JOINT (a DiT)",
            )


def _text_token_ids(text: str, field: str, engine: ImageGeneration, violations: Violations) -> list[int]:
    """The text encoder's tokens of text, start and end tokens included; refused when they do not
    fit the text encoder (diffusers would cut them off silently)."""
    limit = engine.max_text_tokens
    # Cheap bound before tokenizing: a token is at least one character.
    if len(text) > 32 * limit:
        violations.add(field, f"is far longer than the text encoder's {limit} tokens")
        return []
    ids = engine.tokenizer(text).input_ids
    if len(ids) > limit:
        violations.add(
            field, f"{len(ids)} tokens (with start and end tokens) exceed the text encoder's {limit}"
        )
    return ids


def _side(value: int, field: str, default: int, multiple: int, largest: int, violations: Violations) -> int:
    side = value or default
    if side < multiple or side % multiple or side > largest:
        top = largest - largest % multiple
        violations.add(field, f"must be a multiple of {multiple} in [{multiple}, {top}] (got {side})")
    return side
