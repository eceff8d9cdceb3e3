"""The served models: each a loaded engine with its limits and presets, described for GetModel."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from attnserve_client.spec import intervention_from_dict
from attnserve_client.v1 import inference_service_pb2, intervention_pb2, model_pb2

from ..engines.base import Engine, EngineInfo, VisionInfo, served_rpcs
from ..spec.errors import ModelNotFound
from ..spec.geometry import AttentionLayer
from ..spec.ranges import PARAMETER_RANGES
from .config import Limits

MODEL_KINDS = {
    "llm": model_pb2.MODEL_KIND_LLM,
    "vlm": model_pb2.MODEL_KIND_VLM,
    "diffusion": model_pb2.MODEL_KIND_DIFFUSION,
}
#: The names of GenerateRequest's visual_recipe fields ("carve", "visual_funnel").
VISUAL_RECIPES = tuple(
    field.name
    for field in inference_service_pb2.GenerateRequest.DESCRIPTOR.oneofs_by_name["visual_recipe"].fields
)


def visual_recipes(info: EngineInfo) -> tuple[str, ...]:
    """The visual recipes Generate runs on the model."""
    return VISUAL_RECIPES if info.runs_visual_recipes else ()


ENGINE_KINDS = {
    "transformers": model_pb2.ENGINE_KIND_TRANSFORMERS,
    "vllm": model_pb2.ENGINE_KIND_VLLM,
    "diffusers": model_pb2.ENGINE_KIND_DIFFUSERS,
}


@dataclass
class ServedModel:
    name: str
    kind: str
    engine_name: str
    engine: Engine
    limits: Limits
    presets: Mapping[str, model_pb2.Preset]

    def describe(self) -> model_pb2.Model:
        info = self.engine.info
        geo = info.geometry
        limits = self.limits
        return model_pb2.Model(
            name=self.name,
            kind=MODEL_KINDS[self.kind],
            engine=ENGINE_KINDS[self.engine_name],
            num_layers=len(geo.language_model_layers),
            num_heads=geo.num_heads,
            num_kv_heads=geo.num_kv_heads,
            head_dim=geo.head_dim,
            max_context_length=info.max_context_length,
            supported_operations=[
                intervention_pb2.OperationKind.Value(f"OPERATION_KIND_{op.upper()}")
                for op in sorted(info.supported_operations)
            ],
            supported_readouts=[
                model_pb2.ReadoutKind.Value(f"READOUT_KIND_{r.upper()}")
                for r in sorted(info.supported_readouts)
            ],
            supported_rpcs=served_rpcs(self.engine),
            input_modalities=sorted(info.input_modalities),
            presets=list(self.presets.values()),
            unsupported_reason=info.unsupported_reason or "",
            parameter_ranges=[
                model_pb2.ParameterRange(
                    field=field,
                    min=r.low,
                    max=r.high,
                    min_exclusive=r.low_open,
                    max_exclusive=r.high_open,
                    zero_allowed=r.zero_allowed,
                )
                for field, r in PARAMETER_RANGES.items()
            ],
            limits=model_pb2.ModelLimits(
                max_prompt_tokens=limits.max_prompt_tokens,
                max_tokens=limits.max_tokens,
                max_interventions=limits.max_interventions,
                max_readout_values=limits.max_readout_values,
                max_logprobs=limits.max_logprobs,
                max_images=limits.max_images,
                max_image_bytes=limits.max_image_bytes,
                max_image_pixels=limits.max_image_pixels,
            ),
            vision=vision_proto(info.vision) if info.vision is not None else None,
            supported_recipes=visual_recipes(info),
            layers=[layer_proto(layer) for layer in geo.layers],
        )


def vision_proto(vision: VisionInfo) -> model_pb2.VisionGeometry:
    return model_pb2.VisionGeometry(
        tokens_per_image=vision.tokens_per_image,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        grid_size=vision.grid_size,
        num_layers=vision.num_layers,
        num_heads=vision.num_heads,
        head_dim=vision.head_dim,
        image_token_id=vision.image_token_id,
    )


def layer_proto(layer: AttentionLayer) -> model_pb2.AttentionLayer:
    return model_pb2.AttentionLayer(
        name=layer.name,
        index=layer.index,
        kind=intervention_pb2.AttentionKind.Value(f"ATTENTION_KIND_{layer.kind.name}"),
        causal=layer.causal,
        component=model_pb2.ModelComponent.Value(f"MODEL_COMPONENT_{layer.component.name}"),
        num_heads=layer.num_heads,
        num_kv_heads=layer.num_kv_heads,
        head_dim=layer.head_dim,
    )


def preset_proto(
    name: str, description: str, interventions, provenance: Mapping[str, str]
) -> model_pb2.Preset:
    """A preset from config (interventions as plain dicts, the spec-file format)."""
    return model_pb2.Preset(
        name=name,
        description=description,
        interventions=[
            intervention_from_dict(iv, f"presets.{name}.interventions[{i}]")
            for i, iv in enumerate(interventions)
        ],
        provenance=dict(provenance),
    )


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    def __iter__(self):
        return iter(self._models.values())
