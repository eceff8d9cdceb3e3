"""GenerateRequest, ScoreRequest and GenerateImageRequest construction shared by the sync and
asyncio clients."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from google.protobuf import json_format

from attnserve_client.spec import intervention_spec_from_dict, readout_spec_from_dict
from attnserve_client.v1 import image_generation_pb2, intervention_pb2, readout_pb2, visual_recipe_pb2
from attnserve_client.v1 import inference_service_pb2 as service_pb2

if TYPE_CHECKING:
    from typing import Unpack  # typing.Unpack needs Python 3.11

# One part of a message's content: text (str), an encoded PNG/JPEG/WebP image (bytes, or the path
# of an image file), or a {"text": ...} / {"image": bytes or path} dict.
Part = str | bytes | os.PathLike | Mapping[str, Any]
# A chat message as a proto, a {"role": ..., "content": ...} dict or a (role, content) pair;
# content is text or a list of parts (images for vision-language models).
Message = service_pb2.ChatMessage | Mapping[str, Any] | tuple[str, str | Sequence[Part]]
Interventions = (
    intervention_pb2.InterventionSpec | Mapping[str, Any] | Iterable[intervention_pb2.Intervention]
)
Readouts = readout_pb2.ReadoutSpec | Mapping[str, Any]

# Keep messages of a few long attention rows comfortably under the limits.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Pings only while a call is open, so a long prefill behind a proxy keeps its connection.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


class GenerateOptions(TypedDict, total=False):
    """The keyword options of a Generate call; unset sampling fields take the server's defaults."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: Sequence[str] | str
    top_logprobs: int
    ignore_eos: bool
    interventions: Interventions
    presets: Sequence[str]
    readouts: Readouts
    request_id: str
    #: A visual recipe (one of them), as its message or dict, e.g. {} for the authors' defaults or
    #: {"top_fraction": 0.3}: the server runs its passes and returns the final answer.
    carve: visual_recipe_pb2.CarveRecipe | Mapping[str, Any]
    visual_funnel: visual_recipe_pb2.VisualFunnelRecipe | Mapping[str, Any]


def generate_request(
    model: str,
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    **options: Unpack[GenerateOptions],
) -> service_pb2.GenerateRequest:
    """Build a GenerateRequest from exactly one of a raw prompt or chat messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt (raw text) or messages (chat)")
    unknown = options.keys() - GenerateOptions.__optional_keys__
    if unknown:
        raise TypeError(f"unknown generate option(s): {', '.join(sorted(unknown))}")
    stop = options.get("stop", ())
    request = service_pb2.GenerateRequest(
        model=model,
        sampling=service_pb2.SamplingParams(
            max_tokens=options.get("max_tokens"),
            temperature=options.get("temperature"),
            top_p=options.get("top_p"),
            top_k=options.get("top_k"),
            seed=options.get("seed"),
            stop=[stop] if isinstance(stop, str) else stop,
            top_logprobs=options.get("top_logprobs", 0),
            ignore_eos=options.get("ignore_eos", False),
        ),
        request_id=options.get("request_id", ""),
    )
    if prompt is not None:
        request.prompt = prompt
    else:
        request.chat.messages.extend(_chat_message(m) for m in messages)
    spec = _intervention_spec(options.get("interventions"))
    spec.presets.extend(options.get("presets", ()))
    if spec.presets or spec.interventions:
        request.interventions.CopyFrom(spec)
    readouts = options.get("readouts")
    if readouts is not None:
        request.readouts.CopyFrom(
            readouts if isinstance(readouts, readout_pb2.ReadoutSpec) else readout_spec_from_dict(readouts)
        )
    recipes = [name for name in ("carve", "visual_funnel") if options.get(name) is not None]
    if len(recipes) > 1:
        raise ValueError("pass at most one visual recipe (carve or visual_funnel)")
    for name in recipes:
        recipe = options[name]
        field = getattr(request, name)
        if isinstance(recipe, Mapping):
            json_format.ParseDict(recipe, field)
        else:
            field.CopyFrom(recipe)
        field.SetInParent()
    return request


class ImageOptions(TypedDict, total=False):
    """The keyword options of a GenerateImage call; unset fields take the server's defaults."""

    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    interventions: Interventions
    presets: Sequence[str]
    #: A PerturbedAttentionGuidance or its dict, e.g. {"scale": 3.0, "layers": ["mid"]} (PAG)
    #: or {"soft": {"heads": [{"layer": 6, "heads": [0, 1]}], "u": 0.5}} (SoftPAG).
    pag: image_generation_pb2.PerturbedAttentionGuidance | Mapping[str, Any]
    #: Prompt words whose DAAM heatmaps come back with the images.
    word_heatmaps: Sequence[str]
    #: Content and style words ("The Cow of Rembrandt"): the IoU curve of their maps comes back.
    content_words: Sequence[str]
    style_words: Sequence[str]
    #: Boxes bound to prompt spans: LayoutBinding messages or their dicts, e.g.
    #: {"x0": 0.5, "y0": 0, "x1": 1, "y1": 1, "words": ["cat"], "strength": 5}.
    layout: Sequence[image_generation_pb2.LayoutBinding | Mapping[str, Any]]
    request_id: str


def image_request(
    model: str, prompt: str, **options: Unpack[ImageOptions]
) -> image_generation_pb2.GenerateImageRequest:
    """Build a GenerateImageRequest."""
    unknown = options.keys() - ImageOptions.__optional_keys__
    if unknown:
        raise TypeError(f"unknown generate_image option(s): {', '.join(sorted(unknown))}")
    request = image_generation_pb2.GenerateImageRequest(
        model=model,
        prompt=prompt,
        negative_prompt=options.get("negative_prompt", ""),
        width=options.get("width", 0),
        height=options.get("height", 0),
        steps=options.get("steps", 0),
        guidance_scale=options.get("guidance_scale"),
        seed=options.get("seed"),
        num_images=options.get("num_images", 0),
        request_id=options.get("request_id", ""),
    )
    spec = _intervention_spec(options.get("interventions"))
    spec.presets.extend(options.get("presets", ()))
    if spec.presets or spec.interventions:
        request.interventions.CopyFrom(spec)
    request.word_heatmaps.words.extend(options.get("word_heatmaps", ()))
    request.word_heatmaps.content_words.extend(options.get("content_words", ()))
    request.word_heatmaps.style_words.extend(options.get("style_words", ()))
    for binding in options.get("layout", ()):
        if isinstance(binding, image_generation_pb2.LayoutBinding):
            request.layout.append(binding)
        else:
            json_format.ParseDict(binding, request.layout.add())
    pag = options.get("pag")
    if isinstance(pag, image_generation_pb2.PerturbedAttentionGuidance):
        request.pag.CopyFrom(pag)
    elif pag is not None:
        json_format.ParseDict(pag, request.pag)
    return request


def score_request(
    model: str,
    candidates: Sequence[str],
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    *,
    interventions: Interventions | None = None,
    presets: Sequence[str] = (),
    request_id: str = "",
) -> service_pb2.ScoreRequest:
    """Build a ScoreRequest from exactly one of a raw prompt or chat messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt (raw text) or messages (chat)")
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of answers, not one string")
    request = service_pb2.ScoreRequest(model=model, candidates=candidates, request_id=request_id)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.chat.messages.extend(_chat_message(m) for m in messages)
    spec = _intervention_spec(interventions)
    spec.presets.extend(presets)
    if spec.presets or spec.interventions:
        request.interventions.CopyFrom(spec)
    return request


def _chat_message(message: Message) -> service_pb2.ChatMessage:
    if isinstance(message, service_pb2.ChatMessage):
        return message
    if isinstance(message, Mapping):
        role, content = message["role"], message["content"]
    else:
        role, content = message
    if isinstance(content, str):
        return service_pb2.ChatMessage(role=role, content=content)
    return service_pb2.ChatMessage(role=role, parts=[_content_part(part) for part in content])


def _content_part(part: Part) -> service_pb2.ContentPart:
    if isinstance(part, Mapping):
        if set(part) == {"text"}:
            return service_pb2.ContentPart(text=part["text"])
        if set(part) == {"image"}:
            return service_pb2.ContentPart(image=_image_bytes(part["image"]))
        raise ValueError(f"a content part dict has exactly one key, text or image (got {sorted(part)})")
    if isinstance(part, str):
        return service_pb2.ContentPart(text=part)
    return service_pb2.ContentPart(image=_image_bytes(part))


def _image_bytes(image: bytes | os.PathLike) -> bytes:
    """Encoded image bytes as given, or read from an image file (the server decodes them)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, os.PathLike):
        return pathlib.Path(image).read_bytes()
    raise TypeError(f"an image is encoded bytes or a file path, not {type(image).__name__}")


def _intervention_spec(interventions: Interventions | None) -> intervention_pb2.InterventionSpec:
    spec = intervention_pb2.InterventionSpec()
    if isinstance(interventions, intervention_pb2.InterventionSpec):
        spec.CopyFrom(interventions)
    elif isinstance(interventions, Mapping):
        spec.CopyFrom(intervention_spec_from_dict(interventions))
    elif interventions is not None:
        spec.interventions.extend(interventions)
    return spec
