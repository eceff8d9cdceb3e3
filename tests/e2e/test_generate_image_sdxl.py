"""GenerateImage end to end on an SDXL-style UNet: a real server serving tiny-sdxl on a real socket."""

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
from .test_generate_image import collect, decoded

pytestmark = pytest.mark.e2e

MODEL = "tiny-sdxl"


@pytest.fixture(scope="module")
def stub(tmp_path_factory, tiny_sdxl_path):
    with (
        diffusion_server(tmp_path_factory.mktemp("sdxl-server"), MODEL, tiny_sdxl_path) as server,
        grpc.insecure_channel(server["target"]) as channel,
    ):
        yield pb_grpc.InferenceServiceStub(channel)


def test_get_model_lists_self_and_cross_attention_layers(stub):
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    assert list(model.supported_rpcs) == ["GenerateImage"]
    assert len(model.layers) == 16
    assert [layer.name.rsplit(".", 1)[1] for layer in model.layers] == ["attn1", "attn2"] * 8
    assert [layer.kind for layer in model.layers] == [
        intervention_pb2.ATTENTION_KIND_SELF,
        intervention_pb2.ATTENTION_KIND_CROSS,
    ] * 8
    assert {layer.component for layer in model.layers} == {model_pb2.MODEL_COMPONENT_UNET_BLOCK}


def test_pag_images_are_pngs_of_the_asked_size_and_diffusers_sdxl_pag(stub, tiny_sdxl_path):
    from diffusers import StableDiffusionXLPAGPipeline

    request = ipb.GenerateImageRequest(
        model=MODEL,
        prompt="a photo of a cat",
        width=40,
        height=24,
        steps=3,
        seed=0,
        num_images=2,
        guidance_scale=7.0,
        pag=ipb.PerturbedAttentionGuidance(scale=3.0),
    )
    steps, complete = collect(stub, request)
    assert [s.step for s in steps] == [0, 1, 2]
    assert len(complete.images) == 2
    for image in complete.images:
        assert decoded(image).size == (40, 24) and (image.width, image.height) == (40, 24)

    pipe = StableDiffusionXLPAGPipeline.from_pretrained(
        tiny_sdxl_path, local_files_only=True, add_watermarker=False
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
