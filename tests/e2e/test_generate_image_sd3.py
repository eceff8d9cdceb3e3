"""GenerateImage end to end on an SD3-style DiT: a real server serving tiny-sd3 on a real socket."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from attnserve_client.v1 import image_generation_pb2 as ipb
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2, model_pb2

from .conftest import diffusion_server
from .helpers import field_violations
from .test_generate_image import collect, decoded

pytestmark = pytest.mark.e2e

MODEL = "tiny-sd3"


@pytest.fixture(scope="module")
def stub(tmp_path_factory, tiny_sd3_path):
    with (
        diffusion_server(tmp_path_factory.mktemp("sd3-server"), MODEL, tiny_sd3_path) as server,
        grpc.insecure_channel(server["target"]) as channel,
    ):
        yield pb_grpc.InferenceServiceStub(channel)


def request(**fields) -> ipb.GenerateImageRequest:
    defaults = {
        "model": MODEL,
        "prompt": "a photo of a cat",
        "width": 32,
        "height": 32,
        "steps": 3,
        "seed": 0,
    }
    return ipb.GenerateImageRequest(**(defaults | fields))


def test_get_model_lists_the_joint_attention_layers(stub):
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    assert list(model.supported_rpcs) == ["GenerateImage"]
    assert [layer.name for layer in model.layers] == [
        "transformer_blocks.0.attn",
        "transformer_blocks.1.attn",
    ]
    assert {layer.kind for layer in model.layers} == {intervention_pb2.ATTENTION_KIND_JOINT}
    assert {layer.component for layer in model.layers} == {model_pb2.MODEL_COMPONENT_DIT_BLOCK}
    assert [(layer.num_heads, layer.head_dim) for layer in model.layers] == [(4, 8)] * 2


def test_pag_images_are_pngs_of_the_asked_size_and_diffusers_sd3_pag(stub, tiny_sd3_path):
    from diffusers import StableDiffusion3PAGPipeline

    steps, complete = collect(
        stub,
        request(
            width=40,
            height=24,
            num_images=2,
            guidance_scale=7.0,
            pag=ipb.PerturbedAttentionGuidance(scale=3.0),
        ),
    )
    assert [s.step for s in steps] == [0, 1, 2]
    assert len(complete.images) == 2
    for image in complete.images:
        assert decoded(image).size == (40, 24) and (image.width, image.height) == (40, 24)

    pipe = StableDiffusion3PAGPipeline.from_pretrained(
        tiny_sd3_path, local_files_only=True, text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a photo of a cat",
        num_inference_steps=3,
        height=24,
        width=40,
        num_images_per_prompt=2,
        guidance_scale=7.0,
        pag_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images
    for image, reference in zip(complete.images, theirs):
        # Equal to 1e-5 before quantisation: at most one level apart after it.
        ours = np.asarray(decoded(image)).astype(int)
        assert np.abs(ours - np.asarray(reference).astype(int)).max() <= 1


def _joint_emphasis() -> intervention_pb2.InterventionSpec:
    return intervention_pb2.InterventionSpec(
        interventions=[
            intervention_pb2.Intervention(
                selector=intervention_pb2.Selector(
                    attention=intervention_pb2.ATTENTION_KIND_JOINT,
                    keys=intervention_pb2.KeySelector(ranges=[intervention_pb2.TokenRange(start=1, end=3)]),
                ),
                key_emphasis=intervention_pb2.KeyEmphasis(alpha=0.01),
            )
        ]
    )


def test_key_emphasis_on_the_text_keys_of_joint_layers(stub):
    _, plain = collect(stub, request())
    _, edited = collect(stub, request(interventions=_joint_emphasis()))
    difference = np.abs(
        np.asarray(decoded(plain.images[0])).astype(int) - np.asarray(decoded(edited.images[0])).astype(int)
    )
    assert difference.max() > 0


def test_word_heatmaps_come_back_per_word_and_image(stub):
    _, complete = collect(
        stub, request(num_images=2, word_heatmaps=ipb.WordHeatmapsSpec(words=["cat", "photo"]))
    )
    assert [(h.word, h.image) for h in complete.word_heatmaps] == [
        ("cat", 0),
        ("photo", 0),
        ("cat", 1),
        ("photo", 1),
    ]
    for heatmap in complete.word_heatmaps:
        values = np.asarray(heatmap.values)
        assert (heatmap.width, heatmap.height) == (32, 32) and values.shape == (32 * 32,)
        assert values.min() == 0 and values.max() == pytest.approx(1)


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("pag.layers[0]", request(pag=ipb.PerturbedAttentionGuidance(layers=["mid"]))),
        (
            "pag.soft.u",
            request(
                pag=ipb.PerturbedAttentionGuidance(
                    soft=ipb.SoftPerturbation(heads=[intervention_pb2.LayerHeads(layer=1)], u=0.5)
                )
            ),
        ),
        (
            "word_heatmaps",
            request(word_heatmaps=ipb.WordHeatmapsSpec(words=["cat"]), interventions=_joint_emphasis()),
        ),
    ],
)
def test_what_a_dit_does_not_take_is_refused_naming_the_field(stub, field, bad):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
