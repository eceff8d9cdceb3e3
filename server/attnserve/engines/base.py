"""The contract between the API layer and the engines: typed requests in, step outputs out."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..attention.plan import EMPTY_PLAN, RequestPlan
from ..readouts.word_heatmaps import ContentStyleWords, HeatmapWord
from ..spec.geometry import ModelGeometry
from ..spec.guidance import PerturbedGuidance


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 64
    #: 0 is greedy.
    temperature: float = 0.0
    top_p: float = 1.0
    #: 0 is off.
    top_k: int = 0
    seed: int | None = None
    top_logprobs: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineRequest:
    """A validated request, tokenized, with its compiled attention plan."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingConfig = SamplingConfig()
    plan: RequestPlan = EMPTY_PLAN
    #: Decoded RGB images (PIL), in prompt order; each one's tokens are at image_spans[i].
    images: tuple[Any, ...] = ()
    #: Half-open prompt positions [start, end) of each image's tokens.
    image_spans: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ScoreRequest:
    """A validated Score request: candidate answers (token ids) to one tokenized prompt."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    #: Each candidate's tokens, at least one each.
    candidate_token_ids: tuple[tuple[int, ...], ...]
    plan: RequestPlan = EMPTY_PLAN
    images: tuple[Any, ...] = ()
    image_spans: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ImageRequest:
    """A validated GenerateImage request, its prompts tokenized for the text encoder."""

    request_id: str
    #: The prompt's and the negative prompt's token ids (start and end tokens included, no padding).
    prompt_token_ids: tuple[int, ...]
    negative_token_ids: tuple[int, ...]
    width: int
    height: int
    steps: int
    #: Classifier-free guidance scale w; 1 runs no unconditional branch.
    guidance_scale: float
    seed: int | None
    num_images: int
    #: Interventions on the conditional (and perturbed) branch; selector steps are denoising steps.
    plan: RequestPlan = EMPTY_PLAN
    perturbed: PerturbedGuidance | None = None
    #: Prompt words whose DAAM heatmaps the request reads out.
    heatmap_words: tuple[HeatmapWord, ...] = ()
    #: Content and style words whose maps' IoU curve the request reads out.
    content_style: ContentStyleWords | None = None

    @property
    def reads_heatmaps(self) -> bool:
        return bool(self.heatmap_words) or self.content_style is not None


@dataclass(frozen=True)
class DenoisingProgress:
    """One denoising step of a request done."""

    step: int
    timestep: int
    #: Seconds since the request's denoising started.
    elapsed: float


@dataclass(frozen=True)
class GeneratedImages:
    """A request's images, as PNG bytes, in order; the last event of its stream."""

    png: tuple[bytes, ...]
    #: Seconds the request waited before its first step.
    queue_seconds: float
    #: Per image, each of ImageRequest.heatmap_words' (height, width) heatmap.
    heatmaps: tuple[tuple[Any, ...], ...] = ()
    #: Per image, the content-vs-style IoU at each threshold (ImageRequest.content_style).
    content_style_iou: tuple[tuple[float, ...], ...] = ()


@dataclass
class TokenOutput:
    """One generated token; token i comes from step i (step 0 is the prefill)."""

    index: int
    token_id: int
    logprob: float
    #: (token_id, logprob), most likely first.
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    #: New text since the previous token (held back while a stop string may still match).
    text: str = ""
    #: Readout name -> this token's step's state, for the per-token readouts (attnserve/readouts/).
    step_readouts: dict[str, Any] = field(default_factory=dict)
    #: Set on the request's last token: "eos", "length" or "stop_string".
    finish_reason: str | None = None
    #: Set on the request's last token: readout name -> result, for the other readouts.
    readouts: dict[str, Any] | None = None
    #: Set on the first token: seconds the request waited before its prefill.
    queue_seconds: float | None = None


@dataclass(frozen=True)
class VisionInfo:
    """A vision-language model's vision tower, as the API layer needs it."""

    #: The token standing for one image in the chat template's output.
    image_token_id: int
    #: Tokens one image becomes in the language model's prompt (the patches of its grid).
    tokens_per_image: int
    image_size: int
    patch_size: int
    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class EngineInfo:
    """What the API layer needs to know about a loaded model."""

    geometry: ModelGeometry
    max_context_length: int
    supported_operations: frozenset[str]
    supported_readouts: frozenset[str]
    #: Why some operations or readouts are unavailable on this model, when some are.
    unsupported_reason: str | None = None
    #: What a request may carry besides its parameters ("text"; "image" once VLMs land).
    input_modalities: frozenset[str] = frozenset({"text"})
    #: Set for vision-language models.
    vision: VisionInfo | None = None
    #: Whether the engine reads the vision tower's attention to choose image tokens (PAINT's
    #: local and summary selectors).
    chooses_visual_tokens: bool = True

    @property
    def runs_visual_recipes(self) -> bool:
        """Whether Generate's visual recipes (CARVE, Visual Funnel) can run: they read the
        image attention of a vision-language model's passes."""
        return self.vision is not None and "image_attention" in self.supported_readouts


class EngineError(RuntimeError):
    """The engine failed while serving a request (INTERNAL)."""


class EngineDead(EngineError):
    """The engine can serve no more (its process or scheduler died): UNAVAILABLE, and the server
    stops so that it is restarted."""


class NonFiniteOutput(EngineError):
    """A request's logits or scores went NaN or infinite. That request alone fails; the others
    in its batch go on."""

    def __init__(self, what: str):
        super().__init__(
            f"{what} became NaN or infinite; the request's interventions or sampling settings may "
            "be too extreme for this model"
        )


class Engine(abc.ABC):
    """A loaded model: its description, lifecycle and load. What it serves is declared by the
    capability classes below that it also derives from; the servicer routes by them."""

    info: EngineInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin serving (the model is loaded by then)."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop serving and release the model."""

    @property
    def failure(self) -> str | None:
        """Why the engine can serve no more, once it cannot; None while it can."""
        return None

    @property
    @abc.abstractmethod
    def num_running(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_waiting(self) -> int: ...


class TextGeneration(abc.ABC):
    """Capability: Generate. Streams tokens for tokenized prompts."""

    tokenizer: object

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[TokenOutput]:
        """Stream the request's tokens; the last carries finish_reason and readouts. Closing
        the iterator early (cancel, deadline) removes the request from the batch at the next
        step."""


class CandidateScoring(abc.ABC):
    """Capability: Score. Log-probabilities of candidate answers to a prompt."""

    @abc.abstractmethod
    async def score(self, request: ScoreRequest) -> list[float]:
        """Each candidate's summed token log-probability after the prompt, teacher-forced in one
        forward with the request's plan (engines/hf/scoring.py defines the computation)."""


class ImageGeneration(abc.ABC):
    """Capability: GenerateImage. Text-to-image denoising with per-request attention plans."""

    tokenizer: object
    #: The text encoder's sequence length (prompts longer than this are refused).
    max_text_tokens: int
    #: (height, width) in pixels when a request leaves them unset.
    default_size: tuple[int, int]
    #: Image sides are multiples of this (the VAE's downsampling, times a DiT's patch size).
    size_multiple: int = 8

    @abc.abstractmethod
    def generate_image(self, request: ImageRequest) -> AsyncIterator[DenoisingProgress | GeneratedImages]:
        """Stream one DenoisingProgress per step, then the GeneratedImages. Closing the iterator
        early (cancel, deadline) drops the request from its batch before the next step."""

    def query_grids(self, height: int, width: int) -> Mapping[int, tuple[int, int]]:
        """Cross-attention layer -> the (rows, cols) grid of its image tokens (row-major queries)
        for an image of this size; empty when the model binds no layout (LayoutBinding)."""
        return {}


#: RPC -> the capability an engine needs to serve it.
RPC_CAPABILITIES: dict[str, type] = {
    "Generate": TextGeneration,
    "Score": CandidateScoring,
    "GenerateImage": ImageGeneration,
}


def served_rpcs(engine: Engine) -> tuple[str, ...]:
    """The InferenceService RPCs (beyond ListModels and GetModel) the engine can serve."""
    return tuple(rpc for rpc, capability in RPC_CAPABILITIES.items() if isinstance(engine, capability))
