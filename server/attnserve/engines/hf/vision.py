"""The transformers engine's vision side: a LLaVA-family model's vision tower run on a request's
images, its encoder's attention hooked to read the CLS query's rows.

The language model's layers use the "attnserve" attention (attention.py) like any causal LM; the
vision encoder's layers use "attnserve_vision": the engine's own SDPA, plus, when a forward
carries an `attnserve_vision` VisionCapture, the CLS->patch attention of the layers PAINT's
token selection reads (the first and the penultimate). The vLLM engine reads the same rows from
vLLM's own tower pass in its worker (engines/vllm/tower_captures.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoProcessor, LlavaForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ...attention.paint import cls_patch_attention, needs_visual_keys, paint_layers, resolve_paint_keys
from ...attention.plan import RequestPlan
from ...spec.geometry import ModelGeometry
from ..base import VisionInfo
from . import attention

VISION_ATTN_IMPLEMENTATION = "attnserve_vision"


class VisionCapture:
    """Collects the head-mean CLS->patch attention of each image, (images, patches) float32, in
    the vision encoder layers PAINT reads (the first and the penultimate)."""

    def __init__(self, num_layers: int):
        self.layers = paint_layers(num_layers)
        self.cls_rows: dict[int, torch.Tensor] = {}

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        if layer in self.layers:
            self.cls_rows[layer] = cls_patch_attention(query, key, scale)

    def resolve(
        self, plan: RequestPlan, image_spans: Sequence[tuple[int, int]], first_image: int
    ) -> RequestPlan:
        """plan with PAINT's tokens chosen for its images, images first_image.. of the capture."""
        images = slice(first_image, first_image + len(image_spans))
        first, penultimate = (self.cls_rows[layer][images] for layer in self.layers)
        return resolve_paint_keys(plan, image_spans, first, penultimate)


def vision_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """query, key, value (images, heads, 1 + patches, head_dim): bidirectional, no mask."""
    capture: VisionCapture | None = kwargs.pop("attnserve_vision", None)
    if capture is not None:
        capture.record(module.attnserve_vision_layer, query, key, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register() -> None:
    attention.register()
    AttentionInterface.register(VISION_ATTN_IMPLEMENTATION, vision_attention)


def is_vision_language(model_path: Path) -> bool:
    """Whether a local model directory holds a vision-language model (a config with a vision tower)."""
    from transformers import AutoConfig

    return hasattr(AutoConfig.from_pretrained(model_path, local_files_only=True), "vision_config")


def load_vision_language_model(model_path: Path, *, dtype, device: str):
    """(processor, model) of a local LLaVA-family model, the language model on "attnserve"
    attention and the vision encoder on "attnserve_vision"."""
    register()
    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
    model = (
        LlavaForConditionalGeneration.from_pretrained(
            model_path,
            dtype=dtype,
            attn_implementation={
                "text_config": attention.ATTN_IMPLEMENTATION,
                "vision_config": VISION_ATTN_IMPLEMENTATION,
                "": "sdpa",
            },
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
        )
        .eval()
        .to(device)
    )
    for i, layer in enumerate(model.model.vision_tower.encoder.layers):
        layer.self_attn.attnserve_vision_layer = i  # vision layers carry no layer_idx of their own
    return processor, model


def vision_info(config) -> VisionInfo:
    """From a LLaVA-family config (the "default" feature strategy: one token per patch)."""
    vision = config.vision_config
    grid = vision.image_size // vision.patch_size
    return VisionInfo(
        image_token_id=config.image_token_id,
        tokens_per_image=grid * grid,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        num_layers=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads,
        head_dim=vision.hidden_size // vision.num_attention_heads,
    )


def language_model_geometry(config) -> ModelGeometry:
    """The language model's layers, named as they sit in transformers' model."""
    geometry = ModelGeometry.of_config(config.text_config)
    return ModelGeometry(
        tuple(
            dataclasses.replace(layer, name=f"model.language_model.layers.{layer.index}.self_attn")
            for layer in geometry.layers
        )
    )


class VisionTower:
    """Runs the tower on images: their features for the language model's image tokens."""

    def __init__(self, model, processor, device: torch.device):
        self._model = model
        self._image_processor = processor.image_processor
        self._device = device
        self.info = vision_info(model.config)
        if model.config.vision_feature_select_strategy != "default":
            raise ValueError("only LLaVA's 'default' feature strategy (CLS dropped) is supported")

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        pixels = self._image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self._device, self._model.dtype)

    def encode(self, images: Sequence, capture: VisionCapture | None = None):
        """The tower's output for these images (mm_encoder_outputs["image"] of the model's forward)."""
        kwargs = {} if capture is None else {"attnserve_vision": capture}
        return self._model.model.get_image_features(pixel_values=self.pixel_values(images), **kwargs)


def encode_batch(
    tower: VisionTower | None, rows: Sequence[tuple[Sequence, Sequence[tuple[int, int]], RequestPlan]]
) -> tuple[dict | None, list[RequestPlan]]:
    """The image features of a forward's rows ((images, image_spans, plan) each, in batch order:
    the model fills image tokens row by row) as its mm_encoder_outputs, or None without images,
    and each row's plan with its PAINT keys chosen from this very run of the tower."""
    plans = [plan for _, _, plan in rows]
    images = [image for row_images, _, _ in rows for image in row_images]
    if not images:
        return None, plans
    if tower is None:
        raise ValueError("images sent to a model without a vision tower")
    painting = [needs_visual_keys(plan) for plan in plans]
    capture = VisionCapture(tower.info.num_layers) if any(painting) else None
    features = tower.encode(images, capture)
    first = 0
    for b, (row_images, spans, plan) in enumerate(rows):
        if painting[b]:
            plans[b] = capture.resolve(plan, spans, first)
        first += len(row_images)
    return {"image": features}, plans
