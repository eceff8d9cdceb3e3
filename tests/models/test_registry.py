"""ServedModel.describe: GetModel's Model, each attention layer listed."""

from __future__ import annotations

from types import SimpleNamespace

from attnserve.engines.base import EngineInfo
from attnserve.models.config import Limits
from attnserve.models.registry import ServedModel
from attnserve.spec.geometry import AttentionKind, AttentionLayer, Component, ModelGeometry
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import model_pb2


def describe(geometry: ModelGeometry) -> model_pb2.Model:
    info = EngineInfo(
        geometry=geometry,
        max_context_length=128,
        supported_operations=frozenset({"key_mask"}),
        supported_readouts=frozenset(),
    )
    served = ServedModel(
        name="tiny",
        kind="llm",
        engine_name="transformers",
        engine=SimpleNamespace(info=info),
        limits=Limits(),
        presets={},
    )
    return served.describe()


def test_a_causal_lm_lists_its_layers_and_their_shared_shape():
    model = describe(ModelGeometry.causal_lm(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16))
    assert (model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim) == (2, 8, 2, 16)
    assert list(model.layers) == [
        model_pb2.AttentionLayer(
            name=f"model.layers.{i}.self_attn",
            index=i,
            kind=ipb.ATTENTION_KIND_SELF,
            causal=True,
            component=model_pb2.MODEL_COMPONENT_LANGUAGE_MODEL,
            num_heads=8,
            num_kv_heads=2,
            head_dim=16,
        )
        for i in range(2)
    ]


def test_layers_of_different_shapes_and_kinds_are_listed_as_they_are():
    layers = (
        AttentionLayer("down.0.attn1", 0, AttentionKind.SELF, False, Component.UNET_BLOCK, 4, 4, 8),
        AttentionLayer("down.0.attn2", 1, AttentionKind.CROSS, False, Component.UNET_BLOCK, 8, 8, 8),
    )
    model = describe(ModelGeometry(layers))
    # No language-model layers: the fields describing those are 0.
    assert (model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim) == (0, 0, 0, 0)
    assert [(layer.kind, layer.num_heads, layer.causal) for layer in model.layers] == [
        (ipb.ATTENTION_KIND_SELF, 4, False),
        (ipb.ATTENTION_KIND_CROSS, 8, False),
    ]
    assert {layer.component for layer in model.layers} == {model_pb2.MODEL_COMPONENT_UNET_BLOCK}
