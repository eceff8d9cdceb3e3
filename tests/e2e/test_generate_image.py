"""GenerateImage end to end: a real server serving the tiny Stable-Diffusion pipeline on a real
socket, called through raw stubs and through the client SDK."""

from __future__ import annotations

import base64
import io
import json
import time

import grpc
import numpy as np
import pytest
import torch
from attnserve_client import AttnserveError, Client
from attnserve_client.cli import app
from attnserve_client.v1 import image_generation_pb2 as ipb
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2
from PIL import Image
from typer.testing import CliRunner

from .conftest import diffusion_server
from .helpers import field_violations
from .test_grpcurl import grpcurl

pytestmark = pytest.mark.e2e

MODEL = "tiny-sd"


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, tiny_sd_path):
    folder = tmp_path_factory.mktemp("diffusion-server")
    with diffusion_server(folder, MODEL, tiny_sd_path, max_denoising_steps=400) as server:
        yield server


@pytest.fixture(scope="module")
def stub(image_server):
    with grpc.insecure_channel(image_server["target"]) as channel:
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


def collect(stub, req, timeout=120):
    steps, complete = [], None
    for response in stub.GenerateImage(req, timeout=timeout):
        if response.HasField("step"):
            steps.append(response.step)
        else:
            complete = response.complete
    return steps, complete


def decoded(image: ipb.GeneratedImage) -> Image.Image:
    picture = Image.open(io.BytesIO(image.png))
    assert picture.format == "PNG"
    return picture


def test_get_model_describes_the_unet_and_its_rpc(stub):
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    assert list(model.supported_rpcs) == ["GenerateImage"]
    assert len(model.layers) == 8
    assert model.layers[6].name == "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert model.layers[7].kind == intervention_pb2.ATTENTION_KIND_CROSS


def test_images_decode_as_png_of_the_asked_size_after_one_event_per_step(stub):
    steps, complete = collect(stub, request(width=40, height=24, steps=4, num_images=2))
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert all(s.num_steps == 4 for s in steps)
    timesteps = [s.timestep for s in steps]
    assert timesteps == sorted(timesteps, reverse=True) and 0 <= timesteps[-1] < timesteps[0] < 1000
    elapsed = [s.elapsed_seconds for s in steps]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert len(complete.images) == 2
    for image in complete.images:
        picture = decoded(image)
        assert picture.size == (40, 24) and picture.mode == "RGB"
        assert (image.width, image.height) == (40, 24)


def test_pag_over_the_socket_is_diffusers_pag_pipeline(stub, tiny_sd_path):
    from diffusers import StableDiffusionPAGPipeline

    _, complete = collect(stub, request(pag=ipb.PerturbedAttentionGuidance(scale=3.0), seed=7))
    pipe = StableDiffusionPAGPipeline.from_pretrained(
        tiny_sd_path, local_files_only=True, pag_applied_layers=["mid"]
    )
    pipe.set_progress_bar_config(disable=True)
    [theirs] = pipe(
        "a photo of a cat",
        num_inference_steps=3,
        height=32,
        width=32,
        pag_scale=3.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pil",
    ).images
    ours = np.asarray(decoded(complete.images[0])).astype(int)
    # Equal to 1e-5 before quantisation: at most one level apart after it.
    assert np.abs(ours - np.asarray(theirs).astype(int)).max() <= 1


def _cross_identity_blend() -> intervention_pb2.InterventionSpec:
    return intervention_pb2.InterventionSpec(
        interventions=[
            intervention_pb2.Intervention(
                selector=intervention_pb2.Selector(layers=[1]),
                identity_blend=intervention_pb2.IdentityBlend(),
            )
        ]
    )


def _cross_temperature() -> intervention_pb2.InterventionSpec:
    return intervention_pb2.InterventionSpec(
        interventions=[
            intervention_pb2.Intervention(
                selector=intervention_pb2.Selector(attention=intervention_pb2.ATTENTION_KIND_CROSS),
                temperature=intervention_pb2.Temperature(temperature=2.0),
            )
        ]
    )


BAD_REQUESTS = {
    "prompt": request(prompt="  "),
    "width": request(width=30),
    "height": request(height=1024),
    "steps": request(steps=401),
    "num_images": request(num_images=9),
    "guidance_scale": request(guidance_scale=0.5),
    "negative_prompt": request(negative_prompt="cat " * 100),
    "pag.layers[0]": request(pag=ipb.PerturbedAttentionGuidance(layers=["no_such_block"])),
    "pag.scale": request(pag=ipb.PerturbedAttentionGuidance(scale=-1)),
    "pag.soft.heads[0].layer": request(
        pag=ipb.PerturbedAttentionGuidance(
            soft=ipb.SoftPerturbation(heads=[intervention_pb2.LayerHeads(layer=7)])
        )
    ),
    "pag.soft.heads[0].heads[0]": request(
        pag=ipb.PerturbedAttentionGuidance(
            soft=ipb.SoftPerturbation(heads=[intervention_pb2.LayerHeads(layer=6, heads=[8])])
        )
    ),
    "interventions.interventions[0].selector.attention": request(interventions=_cross_identity_blend()),
    "interventions.interventions[0].selector.attention ": request(
        interventions=intervention_pb2.InterventionSpec(
            interventions=[
                intervention_pb2.Intervention(
                    selector=intervention_pb2.Selector(
                        layers=[0],
                        keys=intervention_pb2.KeySelector(
                            ranges=[intervention_pb2.TokenRange(start=1, end=3)]
                        ),
                    ),
                    key_emphasis=intervention_pb2.KeyEmphasis(alpha=5.0),
                )
            ]
        )
    ),
    "interventions.interventions[0].selector.keys.words[0]": request(
        interventions=intervention_pb2.InterventionSpec(
            interventions=[
                intervention_pb2.Intervention(
                    selector=intervention_pb2.Selector(
                        attention=intervention_pb2.ATTENTION_KIND_CROSS,
                        keys=intervention_pb2.KeySelector(words=["dog"]),
                    ),
                    key_emphasis=intervention_pb2.KeyEmphasis(alpha=5.0),
                )
            ]
        )
    ),
    "layout[0].x1": request(layout=[ipb.LayoutBinding(x0=0.5, x1=0.25, y1=1.0, words=["cat"])]),
    "layout[0].words[0]": request(layout=[ipb.LayoutBinding(x1=1.0, y1=1.0, words=["dog"])]),
    "word_heatmaps.words[0]": request(word_heatmaps=ipb.WordHeatmapsSpec(words=["dog"])),
    "word_heatmaps": request(
        word_heatmaps=ipb.WordHeatmapsSpec(words=["cat"]), interventions=_cross_temperature()
    ),
    "interventions.interventions[0].selector.layer_names[0]": request(
        interventions=intervention_pb2.InterventionSpec(
            interventions=[
                intervention_pb2.Intervention(
                    selector=intervention_pb2.Selector(layer_names=["model.layers.*"]),
                    temperature=intervention_pb2.Temperature(temperature=2.0),
                )
            ]
        )
    ),
}


@pytest.mark.parametrize("field", list(BAD_REQUESTS))
def test_bad_field_gets_its_violation(stub, field):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, BAD_REQUESTS[field])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A trailing space tells apart two cases of one field.
    assert field.strip() in field_violations(err.value), field_violations(err.value)


def test_prompt_longer_than_the_text_encoder_is_refused(stub):
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, request(prompt="a photo of a cat " * 30))
    assert "exceed the text encoder's 77" in field_violations(err.value)["prompt"]


def test_generate_on_a_diffusion_model_names_the_rpc_it_serves(stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hi"), timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "GenerateImage" in err.value.details()


def test_cancelled_request_frees_its_slot(stub):
    """A long request cancelled after two steps stops there: a short request sent next finishes
    long before the long one could have (400 steps of 64 x 64 take minutes here)."""
    call = stub.GenerateImage(request(width=64, height=64, steps=400), timeout=600)
    for response, _ in zip(call, range(2)):
        assert response.HasField("step")
    call.cancel()
    started = time.monotonic()
    steps, complete = collect(stub, request(steps=2))
    assert len(steps) == 2 and len(complete.images) == 1
    assert time.monotonic() - started < 30


def test_client_sdk_generate_image(image_server):
    with Client(image_server["target"], timeout=120) as client:
        responses = list(
            client.generate_image(
                MODEL,
                "a red house",
                width=16,
                height=16,
                steps=2,
                seed=3,
                pag={"soft": {"heads": [{"layer": 6, "heads": [0, 1]}], "u": 0.5}},
                word_heatmaps=["red", "house"],
            )
        )
        assert [r.step.step for r in responses[:-1]] == [0, 1]
        complete = responses[-1].complete
        assert decoded(complete.images[0]).size == (16, 16)
        assert [(h.word, h.image, list(h.token_positions)) for h in complete.word_heatmaps] == [
            ("red", 0, [2]),
            ("house", 0, [3]),
        ]
        for heatmap in complete.word_heatmaps:
            values = np.array(heatmap.values).reshape(heatmap.height, heatmap.width)
            assert values.shape == (16, 16) and values.min() == 0 and abs(values.max() - 1) < 1e-6
        with pytest.raises(AttnserveError) as err:
            list(client.generate_image(MODEL, "a red house", width=17))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_saves_the_images_and_word_heatmap_overlays(image_server, tmp_path):
    """attnserve-cli generate-image writes the server's PNGs as they are and each word's heatmap
    over its image."""
    args = ["--width", "16", "--height", "16", "--steps", "2", "--seed", "3", "--num-images", "2"]
    result = CliRunner().invoke(
        app,
        ["generate-image", "a red house", "--model", MODEL, "--out", str(tmp_path), *args]
        + ["--pag-scale", "2", "--word", "house", "--target", image_server["target"], "--timeout", "120"],
    )
    assert result.exit_code == 0, result.output
    with Client(image_server["target"], timeout=120) as client:
        [*_, last] = client.generate_image(
            MODEL, "a red house", width=16, height=16, steps=2, seed=3, num_images=2, pag={"scale": 2}
        )
    for k, image in enumerate(last.complete.images):
        assert (tmp_path / f"image-{k}.png").read_bytes() == image.png
        overlay = Image.open(tmp_path / f"image-{k}-house.png")
        assert overlay.format == "PNG" and overlay.size == (384, 384)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "image-0-house.png",
        "image-0.png",
        "image-1-house.png",
        "image-1.png",
    ]


def test_client_sdk_layout_binding_changes_the_image(image_server):
    """A box bound to "house" over the socket: the image differs from the plain one, and the
    SDK's dict form is the message form."""
    binding = {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 1.0, "words": ["house"], "strength": 20.0}
    options = {"width": 16, "height": 16, "steps": 2, "seed": 3}
    with Client(image_server["target"], timeout=120) as client:
        [*_, plain] = client.generate_image(MODEL, "a red house", **options)
        [*_, bound] = client.generate_image(MODEL, "a red house", layout=[binding], **options)
        [*_, as_message] = client.generate_image(
            MODEL, "a red house", layout=[ipb.LayoutBinding(**binding)], **options
        )
    assert bound.complete.images[0].png == as_message.complete.images[0].png
    assert bound.complete.images[0].png != plain.complete.images[0].png


def test_cli_prints_the_content_style_iou_curve(image_server, tmp_path):
    """The server's IoU of the content and style maps, one value per threshold 0.1 .. 0.9, as
    attnserve-cli generate-image prints it."""
    with Client(image_server["target"], timeout=120) as client:
        [*_, last] = client.generate_image(
            MODEL,
            "a red house by the sea",
            width=16,
            height=16,
            steps=2,
            seed=3,
            num_images=2,
            content_words=["house"],
            style_words=["red", "sea"],
        )
    overlaps = last.complete.content_style_overlaps
    assert [o.image for o in overlaps] == [0, 1]
    for overlap in overlaps:
        assert list(overlap.thresholds) == pytest.approx([0.1 * k for k in range(1, 10)])
        assert len(overlap.iou) == 9 and all(0 <= v <= 1 for v in overlap.iou)
    args = ["--width", "16", "--height", "16", "--steps", "2", "--seed", "3", "--num-images", "2"]
    result = CliRunner().invoke(
        app,
        ["generate-image", "a red house by the sea", "--model", MODEL, "--out", str(tmp_path), *args]
        + ["--content-word", "house", "--style-word", "red", "--style-word", "sea"]
        + ["--target", image_server["target"], "--timeout", "120"],
    )
    assert result.exit_code == 0, result.output
    printed = [line for line in result.stdout.splitlines() if "content/style IoU" in line]
    assert printed == [
        f"image {o.image} content/style IoU "
        + " ".join(f"{t:.1f}:{v:.3f}" for t, v in zip(o.thresholds, o.iou))
        for o in overlaps
    ]


def test_metrics_count_steps_and_images(stub, image_server):
    import urllib.request

    collect(stub, request(steps=2, num_images=3, request_id="metrics"))
    collect(stub, request(steps=2, request_id="metrics-pag", pag=ipb.PerturbedAttentionGuidance(scale=3.0)))
    text = urllib.request.urlopen(image_server["metrics_url"], timeout=10).read().decode()
    labels = f'{{engine="diffusers",model="{MODEL}"}}'
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if labels in line
    }
    assert values[f"attnserve_diffusion_images_generated_total{labels}"] >= 3
    assert values[f"attnserve_diffusion_step_latency_seconds_count{labels}"] >= 2
    assert values[f"attnserve_diffusion_step_latency_seconds_sum{labels}"] > 0
    # PAG's guidance norm: one per image and step of each PAG request.
    guided = values[f"attnserve_diffusion_perturbed_guidance_norm_count{labels}"]
    assert guided >= 2
    assert values[f"attnserve_diffusion_perturbed_guidance_norm_sum{labels}"] > 0
    # The cross-attention shares exist from the model's loading (the default sample rate, 0.05).
    shares = [
        line
        for line in text.splitlines()
        if line.startswith("attnserve_diffusion_cross_attention_share_ratio_count") and MODEL in line
    ]
    assert sorted(line.split('part="')[1].split('"')[0] for line in shares) == ["end", "start", "words"]


def test_grpcurl_generates_an_image(image_server):
    """A third-party client through server reflection: JSON in, a step event per denoising step,
    then the PNG (base64 in JSON) of the asked size."""
    data = {"model": MODEL, "prompt": "a photo of a cat", "width": 40, "height": 24, "steps": 2, "seed": 1}
    data["pag"] = {"scale": 3}
    out = grpcurl(image_server["target"], "attnserve.v1.InferenceService/GenerateImage", data=data)
    assert out.returncode == 0, out.stderr
    decoder, text, events, pos = json.JSONDecoder(), out.stdout.strip(), [], 0
    while pos < len(text):
        event, pos = decoder.raw_decode(text, pos)
        events.append(event)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    assert [event["step"].get("step", 0) for event in events[:-1]] == [0, 1]  # JSON omits a 0
    (image,) = events[-1]["complete"]["images"]
    assert Image.open(io.BytesIO(base64.b64decode(image["png"]))).size == (40, 24)
