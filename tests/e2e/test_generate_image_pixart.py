"""GenerateImage end to end on a PixArt-Sigma-style DiT: a real server serving tiny-pixart on a
real socket."""

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

MODEL = "tiny-pixart"


@pytest.fixture(scope="module")
def stub(tmp_path_factory, tiny_pixart_path):
    with (
        diffusion_server(tmp_path_factory.mktemp("pixart-server"), MODEL, tiny_pixart_path) as server,
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


def pixels(image) -> np.ndarray:
    return np.asarray(decoded(image)).astype(int)


def test_get_model_lists_self_and_cross_attention_of_the_dit_blocks(stub):
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    assert list(model.supported_rpcs) == ["GenerateImage"]
    assert [layer.name for layer in model.layers] == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.0.attn2",
        "transformer_blocks.1.attn1",
        "transformer_blocks.1.attn2",
    ]
    assert [layer.kind for layer in model.layers] == [
        intervention_pb2.ATTENTION_KIND_SELF,
        intervention_pb2.ATTENTION_KIND_CROSS,
    ] * 2
    assert {layer.component for layer in model.layers} == {model_pb2.MODEL_COMPONENT_DIT_BLOCK}


def test_pag_images_are_pngs_of_the_asked_size_and_diffusers_pixart_pag(stub, tiny_pixart_path):
    from diffusers import PixArtSigmaPAGPipeline

    steps, complete = collect(
        stub,
        request(
            width=40,
            height=24,
            num_images=2,
            guidance_scale=4.5,
            pag=ipb.PerturbedAttentionGuidance(scale=3.0),
        ),
    )
    assert [s.step for s in steps] == [0, 1, 2]
    assert len(complete.images) == 2
    for image in complete.images:
        assert decoded(image).size == (40, 24) and (image.width, image.height) == (40, 24)

    pipe = PixArtSigmaPAGPipeline.from_pretrained(tiny_pixart_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a photo of a cat",
        num_inference_steps=3,
        height=24,
        width=40,
        num_images_per_prompt=2,
        guidance_scale=4.5,
        pag_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        use_resolution_binning=False,
        clean_caption=False,
    ).images
    for image, reference in zip(complete.images, theirs):
        # Equal to 1e-5 before quantisation: at most one level apart after it.
        assert np.abs(pixels(image) - np.asarray(reference).astype(int)).max() <= 1


def _cross_emphasis() -> intervention_pb2.InterventionSpec:
    return intervention_pb2.InterventionSpec(
        interventions=[
            intervention_pb2.Intervention(
                selector=intervention_pb2.Selector(
                    attention=intervention_pb2.ATTENTION_KIND_CROSS,
                    keys=intervention_pb2.KeySelector(words=["cat"]),
                ),
                key_emphasis=intervention_pb2.KeyEmphasis(alpha=0.01),
            )
        ]
    )


def test_prompts_are_lowercased_and_key_emphasis_acts_on_the_t5_keys(stub):
    _, plain = collect(stub, request())
    _, capitals = collect(stub, request(prompt="  A Photo of a CAT"))
    _, edited = collect(stub, request(interventions=_cross_emphasis()))
    assert np.array_equal(pixels(plain.images[0]), pixels(capitals.images[0]))
    assert np.abs(pixels(plain.images[0]) - pixels(edited.images[0])).max() > 0


def test_a_layout_binds_the_cross_attention(stub):
    _, plain = collect(stub, request())
    binding = ipb.LayoutBinding(x0=0.5, y0=0, x1=1, y1=1, words=["cat"], strength=20.0)
    _, bound = collect(stub, request(layout=[binding]))
    assert np.abs(pixels(plain.images[0]) - pixels(bound.images[0])).max() > 0


def test_word_heatmaps_come_back_per_word(stub):
    _, complete = collect(stub, request(word_heatmaps=ipb.WordHeatmapsSpec(words=["cat", "photo"])))
    assert [(h.word, h.image) for h in complete.word_heatmaps] == [("cat", 0), ("photo", 0)]
    for heatmap in complete.word_heatmaps:
        values = np.asarray(heatmap.values)
        assert (heatmap.width, heatmap.height) == (32, 32) and values.shape == (32 * 32,)
        assert values.min() == 0 and values.max() == pytest.approx(1)


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("prompt", request(prompt="cat " * 300)),
        (
            "word_heatmaps",
            request(word_heatmaps=ipb.WordHeatmapsSpec(words=["cat"]), interventions=_cross_emphasis()),
        ),
        (
            "word_heatmaps",
            request(
                word_heatmaps=ipb.WordHeatmapsSpec(words=["cat"]),
                layout=[ipb.LayoutBinding(x0=0.5, y0=0, x1=1, y1=1, words=["cat"])],
            ),
        ),
    ],
)
def test_what_pixart_does_not_take_is_refused_naming_the_field(stub, field, bad):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
