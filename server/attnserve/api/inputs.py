"""Input processing: a GenerateRequest (ScoreRequest) proto becomes a validated, tokenized
EngineRequest (ScoreRequest).

Every check runs here, before anything reaches a model; violations name the proto field.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2

from ..engines.base import EngineRequest, SamplingConfig, ScoreRequest
from ..engines.prompts import answer_token_ids, chat_token_ids, expand_image_tokens, prompt_token_ids
from ..models.registry import ServedModel
from ..spec.compile import SpecContext, SpecLimits, compile_plan
from ..spec.errors import Violations, quoted
from ..spec.ranges import ranged_value
from .images import decode_image

DEFAULT_MAX_TOKENS = 64
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
MAX_REQUEST_ID_LENGTH = 128
MAX_SCORE_CANDIDATES = 64
CHAT_ROLES = frozenset({"system", "user", "assistant"})


def to_engine_request(request: pb.GenerateRequest, model: ServedModel) -> EngineRequest:
    violations = Violations()
    limits = model.limits
    sampling = _sampling(request, model, violations)
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        violations.add("request_id", f"at most {MAX_REQUEST_ID_LENGTH} characters")
    prompt = _prompt(request, model, violations)
    prompt_ids = prompt.token_ids
    violations.raise_if_any()

    if len(prompt_ids) > limits.max_prompt_tokens:
        violations.add(
            request.WhichOneof("input"),
            f"{len(prompt_ids)} prompt tokens exceed the limit of {limits.max_prompt_tokens}",
        )
    context = model.engine.info.max_context_length
    if len(prompt_ids) + sampling.max_tokens > context:
        violations.add(
            "sampling.max_tokens",
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceed "
            f"the model's context of {context} tokens",
        )
    violations.raise_if_any()

    plan = compile_plan(
        request.interventions,
        request.readouts,
        _spec_context(model, len(prompt_ids), sampling.max_tokens, prompt.image_spans),
    )
    return EngineRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt_ids),
        sampling=sampling,
        plan=plan,
        images=prompt.images,
        image_spans=prompt.image_spans,
    )


def to_score_request(request: pb.ScoreRequest, model: ServedModel) -> ScoreRequest:
    violations = Violations()
    limits = model.limits
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        violations.add("request_id", f"at most {MAX_REQUEST_ID_LENGTH} characters")
    if not request.candidates:
        violations.add("candidates", "name at least one candidate answer")
    if len(request.candidates) > MAX_SCORE_CANDIDATES:
        violations.add("candidates", f"at most {MAX_SCORE_CANDIDATES} candidates")
    tokenizer = model.engine.tokenizer
    candidate_ids = []
    for i, candidate in enumerate(request.candidates):
        field = f"candidates[{i}]"
        if len(candidate) > 32 * limits.max_tokens:
            violations.add(field, "is far longer than the max_tokens limit")
            continue
        ids = answer_token_ids(tokenizer, candidate)
        if not ids:
            violations.add(field, "must have at least one token")
        elif len(ids) > limits.max_tokens:
            violations.add(field, f"{len(ids)} tokens exceed the max_tokens limit of {limits.max_tokens}")
        candidate_ids.append(ids)
    prompt = _prompt(request, model, violations)
    prompt_ids = prompt.token_ids
    violations.raise_if_any()

    if len(prompt_ids) > limits.max_prompt_tokens:
        violations.add(
            request.WhichOneof("input"),
            f"{len(prompt_ids)} prompt tokens exceed the limit of {limits.max_prompt_tokens}",
        )
    longest = max(len(ids) for ids in candidate_ids)
    context = model.engine.info.max_context_length
    if len(prompt_ids) + longest > context:
        violations.add(
            "candidates",
            f"prompt ({len(prompt_ids)} tokens) + the longest candidate ({longest}) exceed "
            f"the model's context of {context} tokens",
        )
    violations.raise_if_any()

    plan = compile_plan(
        request.interventions,
        readout_pb2.ReadoutSpec(),
        _spec_context(model, len(prompt_ids), longest, prompt.image_spans),
    )
    return ScoreRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt_ids),
        candidate_token_ids=tuple(candidate_ids),
        plan=plan,
        images=prompt.images,
        image_spans=prompt.image_spans,
    )


def _spec_context(
    model: ServedModel, prompt_tokens: int, max_tokens: int, image_spans: tuple[tuple[int, int], ...]
) -> SpecContext:
    limits = model.limits
    return SpecContext(
        geometry=model.engine.info.geometry,
        limits=SpecLimits(limits.max_interventions, limits.max_readout_values),
        presets={name: list(p.interventions) for name, p in model.presets.items()},
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        supported_operations=model.engine.info.supported_operations,
        supported_readouts=model.engine.info.supported_readouts,
        unsupported_reason=model.engine.info.unsupported_reason,
        image_spans=image_spans,
        chooses_visual_tokens=model.engine.info.chooses_visual_tokens,
    )


def _sampling(request: pb.GenerateRequest, model: ServedModel, violations: Violations) -> SamplingConfig:
    s = request.sampling
    limits = model.limits
    max_tokens = s.max_tokens if s.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        violations.add("sampling.max_tokens", f"must be in [1, {limits.max_tokens}] (got {max_tokens})")
    temperature = ranged_value(s, "temperature", 0.0, "sampling.temperature", "sampling", violations)
    top_p = ranged_value(s, "top_p", 1.0, "sampling.top_p", "sampling", violations)
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        violations.add("sampling.top_k", f"must be >= 0 (got {top_k})")
    if not 0 <= s.top_logprobs <= limits.max_logprobs:
        violations.add(
            "sampling.top_logprobs", f"must be in [0, {limits.max_logprobs}] (got {s.top_logprobs})"
        )
    if len(s.stop) > MAX_STOP_STRINGS:
        violations.add("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, stop in enumerate(s.stop):
        if not 0 < len(stop) <= MAX_STOP_LENGTH:
            violations.add(f"sampling.stop[{i}]", f"must have 1 to {MAX_STOP_LENGTH} characters")
    return SamplingConfig(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=s.seed if s.HasField("seed") else None,
        top_logprobs=s.top_logprobs,
        ignore_eos=s.ignore_eos,
        stop=tuple(s.stop),
    )


@dataclass(frozen=True)
class _Prompt:
    token_ids: list[int]
    images: tuple = ()
    image_spans: tuple[tuple[int, int], ...] = ()


def _prompt(
    request: pb.GenerateRequest | pb.ScoreRequest, model: ServedModel, violations: Violations
) -> _Prompt:
    tokenizer = model.engine.tokenizer
    kind = request.WhichOneof("input")
    if kind is None:
        violations.add("input", "set prompt or chat")
        return _Prompt([])
    if kind == "prompt":
        if not request.prompt.strip():
            violations.add("prompt", "must not be empty")
            return _Prompt([])
        # Cheap bound before tokenizing: a token is at least one character in any tokenizer here.
        if len(request.prompt) > 32 * model.limits.max_prompt_tokens:
            violations.add("prompt", "is far longer than the prompt token limit")
            return _Prompt([])
        ids = prompt_token_ids(tokenizer, request.prompt)
        vision = model.engine.info.vision
        if vision is not None and vision.image_token_id in ids:
            violations.add("prompt", "holds the image token; send images as image parts of chat messages")
            return _Prompt([])
        return _Prompt(ids)
    messages = request.chat.messages
    if not messages:
        violations.add("chat.messages", "must hold at least one message")
        return _Prompt([])
    contents: list[str | list[dict]] = []
    images = []
    text_length = 0
    for i, m in enumerate(messages):
        field = f"chat.messages[{i}]"
        if m.role not in CHAT_ROLES:
            violations.add(f"{field}.role", f"must be one of {sorted(CHAT_ROLES)} (got {quoted(m.role)})")
        if m.parts and m.content:
            violations.add(f"{field}.parts", "set content or parts, not both")
        elif m.parts:
            contents.append(_parts(m.parts, f"{field}.parts", model, images, violations))
            text_length += sum(len(p.text) for p in m.parts)
        elif not m.content.strip():
            violations.add(f"{field}.content", "must not be empty")
        else:
            contents.append(m.content)
            text_length += len(m.content)
    if text_length > 32 * model.limits.max_prompt_tokens:
        violations.add("chat.messages", "are far longer than the prompt token limit")
    if violations.items:
        return _Prompt([])
    if tokenizer.chat_template is None:
        violations.add("chat", f"model {model.name!r} has no chat template; send a prompt instead")
        return _Prompt([])
    ids = chat_token_ids(tokenizer, [(m.role, content) for m, content in zip(messages, contents)])
    vision = model.engine.info.vision
    if vision is None:
        return _Prompt(ids)
    if ids.count(vision.image_token_id) != len(images):
        violations.add(
            "chat",
            f"the chat template placed {ids.count(vision.image_token_id)} image tokens for "
            f"{len(images)} images (image tokens may not be written as text)",
        )
        return _Prompt([])
    ids, spans = expand_image_tokens(ids, vision.image_token_id, vision.tokens_per_image)
    return _Prompt(ids, tuple(images), spans)


def _parts(parts, field: str, model: ServedModel, images: list, violations: Violations) -> list[dict]:
    """A message's parts as chat-template content; decoded images are appended to images."""
    limits = model.limits
    takes_images = "image" in model.engine.info.input_modalities
    content = []
    for j, part in enumerate(parts):
        kind = part.WhichOneof("part")
        if kind is None:
            violations.add(f"{field}[{j}]", "set text or image")
        elif kind == "text":
            content.append({"type": "text", "text": part.text})
        elif not takes_images:
            violations.add(
                f"{field}[{j}].image",
                f"model {model.name!r} takes text only (GetModel input_modalities); send no images",
            )
        elif len(images) >= limits.max_images:
            violations.add(f"{field}[{j}].image", f"more than {limits.max_images} images in one request")
        else:
            image = decode_image(
                part.image,
                f"{field}[{j}].image",
                max_bytes=limits.max_image_bytes,
                max_pixels=limits.max_image_pixels,
                violations=violations,
            )
            if image is not None:
                images.append(image)
                content.append({"type": "image"})
    if not any(p.WhichOneof("part") == "image" or p.text.strip() for p in parts):
        violations.add(field, "must hold an image or some text")
    return content
