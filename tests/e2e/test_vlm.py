"""tiny-llava end to end: a real server subprocess on a real socket, real PNG and JPEG files sent
as image parts through the client SDK and raw stubs; every bad image gets its field violation
and the server stays healthy; the visual recipes (CARVE, Visual Funnel) over the wire, and their
bad fields. The server also serves a text-only model (SmolLM2) to refuse
images to."""

from __future__ import annotations

import base64
import io
import urllib.request
import zlib

import grpc
import pytest
import yaml
from attnserve_client import Client
from attnserve_client.spec import readout_spec_from_dict
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import model_pb2
from attnserve_client.v1 import visual_recipe_pb2 as vpb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from .conftest import running_server
from .helpers import field_violations, run

MAX_PIXELS = 200_000
PAINT = [
    {
        "layers": [2, 3],
        "queries": "last",
        "keys": {"image_tokens": {"tokens": part}},
        "logit_rescale": {"alpha": a},
    }
    for part, a in (("paint_local", 0.7), ("paint_summary", 0.3))
]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Real image files: a PNG and a JPEG of a drawn scene."""
    folder = tmp_path_factory.mktemp("images")
    image = Image.new("RGB", (64, 48), "navy")
    image.paste((240, 200, 0), (10, 8, 30, 28))
    image.save(folder / "scene.png")
    image.save(folder / "scene.jpg", quality=90)
    return {"png": folder / "scene.png", "jpeg": folder / "scene.jpg"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llava_path, smollm2_path):
    config = {
        "limits": {"max_tokens": 32, "max_images": 2, "max_image_pixels": MAX_PIXELS},
        "statistics": {"sample_rate": 1.0},  # every step: the visual metrics are checked
        "models": [
            {
                "name": "tiny-llava",
                "kind": "vlm",
                "engine": "transformers",
                "path": str(tiny_llava_path),
                "presets": [{"name": "paint", "description": "PAINT", "interventions": PAINT}],
            },
            {"name": "smollm2", "kind": "llm", "engine": "transformers", "path": str(smollm2_path)},
        ],
    }
    folder = tmp_path_factory.mktemp("vlm-server")
    (folder / "attnserve.yaml").write_text(yaml.safe_dump(config))
    with running_server(folder / "attnserve.yaml", folder / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server["target"]) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def image_chat(*images: bytes, model: str = "tiny-llava", text: str = "what is in the image?", **kwargs):
    parts = [pb.ContentPart(image=data) for data in images] + [pb.ContentPart(text=text)]
    return pb.GenerateRequest(
        model=model,
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts)]),
        sampling=pb.SamplingParams(max_tokens=6, ignore_eos=True),
        **kwargs,
    )


def test_get_model_describes_the_vision_side(stub):
    model = stub.GetModel(pb.GetModelRequest(name="tiny-llava")).model
    assert model.kind == model_pb2.MODEL_KIND_VLM
    assert list(model.input_modalities) == ["image", "text"]
    vision = model.vision
    assert (vision.tokens_per_image, vision.grid_size, vision.image_size, vision.patch_size) == (64, 8, 32, 4)
    assert (vision.num_layers, vision.num_heads, vision.head_dim) == (3, 2, 16)
    assert (model.limits.max_images, model.limits.max_image_pixels) == (2, MAX_PIXELS)
    assert model.limits.max_image_bytes == 8 * 1024 * 1024
    assert model_pb2.READOUT_KIND_IMAGE_ATTENTION in model.supported_readouts
    assert list(model.supported_recipes) == ["carve", "visual_funnel"]
    text_only = stub.GetModel(pb.GetModelRequest(name="smollm2")).model
    assert list(text_only.input_modalities) == ["text"] and not text_only.HasField("vision")
    assert not text_only.supported_recipes


def test_png_and_jpeg_files_through_the_client_sdk(server, image_files):
    with Client(server["target"]) as client:
        answers = {}
        for kind, path in image_files.items():
            messages = [{"role": "user", "content": [path, "what is in the image?"]}]
            answers[kind] = client.complete("tiny-llava", messages=messages, max_tokens=6, ignore_eos=True)
            scores = client.score("tiny-llava", ["yes", "no"], messages=messages)
            assert len(scores.scores) == 2 and all(s.logprob < 0 for s in scores.scores)
    assert all(answers.values())


def test_paint_and_image_attention_over_the_wire(stub, image_files):
    data = image_files["png"].read_bytes()
    _, plain = run(stub, image_chat(data, data))
    assert [(r.start, r.end) for r in plain.image_tokens] == [(5, 69), (69, 133)]
    readouts = {"image_attention": {"layers": [3]}}

    tokens, complete = run(
        stub,
        image_chat(
            data,
            data,
            interventions=ipb.InterventionSpec(presets=["paint"]),
            readouts=readout_spec_from_dict(readouts),
        ),
    )
    assert complete.interventions_applied == 2  # PAINT's two rescales (local, summary)
    for token in tokens:
        assert [(m.image, m.grid_size, len(m.weights)) for m in token.image_attention] == [
            (0, 8, 64),
            (1, 8, 64),
        ]


def test_visual_statistics_in_the_readout_and_the_metrics(server, stub, image_files):
    data = image_files["png"].read_bytes()
    _, complete = run(stub, image_chat(data, readouts=readout_spec_from_dict({"layer_statistics": True})))
    for layer in complete.layer_statistics:
        assert 0 < layer.image_mass < 1 and 0 < layer.image_entropy <= 1
        assert layer.image_query_count > 0
    with urllib.request.urlopen(server["metrics_url"], timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}

    def samples(family: str, suffix: str, model: str) -> dict[str, float]:
        return {
            s.labels["layer"]: s.value
            for s in families[family].samples
            if s.name == family + suffix and s.labels["model"] == model
        }

    for family in ("attnserve_attention_visual_share_ratio", "attnserve_attention_visual_entropy_ratio"):
        counts, sums = samples(family, "_count", "tiny-llava"), samples(family, "_sum", "tiny-llava")
        assert sorted(counts) == ["0", "1", "2", "3"] and all(c > 0 for c in counts.values()), family
        assert all(0 < sums[layer] / counts[layer] <= 1 for layer in counts), family
        assert samples(family, "_count", "smollm2") == {}, "a text-only model has no visual series"


def png_bomb(side: int) -> bytes:
    row = b"\x00" * (side + 1)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
        )

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_every_bad_image_gets_its_violation_and_the_server_stays_healthy(server, stub, image_files):
    png = image_files["png"].read_bytes()
    jpeg = image_files["jpeg"].read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (500, 500), "red").save(big, "PNG")
    field = "chat.messages[0].parts[{}].image"
    cases = [
        (image_chat(png_bomb(4000)), field.format(0), "pixels exceed the limit"),
        (image_chat(big.getvalue()), field.format(0), "250000 pixels exceed the limit of 200000"),
        (image_chat(png[: len(png) // 2]), field.format(0), "truncated or corrupt"),
        (image_chat(jpeg[: len(jpeg) // 2]), field.format(0), "truncated or corrupt"),
        (image_chat(b"this is a text file, not an image\n"), field.format(0), "is not a PNG, JPEG or WebP"),
        (image_chat(png, png, png), field.format(2), "more than 2 images in one request"),
        (image_chat(png, model="smollm2"), field.format(0), "takes text only"),
        (pb.GenerateRequest(model="tiny-llava", prompt="look: <image>"), "prompt", "holds the image token"),
        (
            pb.GenerateRequest(
                model="tiny-llava",
                chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="an <image> written as text")]),
            ),
            "chat",
            "placed 1 image tokens for 0 images",
        ),
        (
            pb.GenerateRequest(
                model="tiny-llava",
                chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="no image here")]),
                interventions=ipb.InterventionSpec(presets=["paint"]),
            ),
            "interventions.presets[0].selector.keys.image_tokens",
            "the request has no images",
        ),
    ]
    for request, expected_field, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            run(stub, request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(caught.value)
        assert expected_field in violations, (expected_field, violations)
        assert message in violations[expected_field]
        # Score takes the same input and answers the same violation.
        score = pb.ScoreRequest(model=request.model, candidates=["yes"], interventions=request.interventions)
        if request.HasField("prompt"):
            score.prompt = request.prompt
        else:
            score.chat.CopyFrom(request.chat)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(score)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in field_violations(caught.value)[expected_field]
    with grpc.insecure_channel(server["target"]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    tokens, _ = run(stub, image_chat(png))
    assert len(tokens) == 6
    assert "Traceback" not in server["log"].read_text()


def test_grpcurl_sends_an_image_as_base64_json(server, image_files):
    from .test_grpcurl import grpcurl

    request = {
        "model": "tiny-llava",
        "chat": {
            "messages": [
                {
                    "role": "user",
                    "parts": [
                        {"image": base64.b64encode(image_files["png"].read_bytes()).decode()},
                        {"text": "what is in the image?"},
                    ],
                }
            ]
        },
        "sampling": {"maxTokens": 4, "ignoreEos": True},
    }
    out = grpcurl(server["target"], "attnserve.v1.InferenceService/Generate", data=request)
    assert out.returncode == 0, out.stderr
    assert '"complete"' in out.stdout and '"image_tokens"' in out.stdout


def test_cli_sends_images_and_draws_the_map(server, image_files, tmp_path):
    from attnserve_client.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    common = ["--model", "tiny-llava", "--target", server["target"], "--timeout", "120"]
    out = tmp_path / "map.png"
    result = runner.invoke(
        app,
        ["generate", "what is in the image?", "--image", str(image_files["png"]), "--image", str(image_files["jpeg"]),
         "--image-map", str(out), "--max-tokens", "3", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    maps = [tmp_path / "map-0.png", tmp_path / "map-1.png"]
    assert all(Image.open(path).size == (384, 384) for path in maps)
    scanpath = tmp_path / "scanpath.png"
    result = runner.invoke(
        app,
        ["generate", "what is in the image?", "--image", str(image_files["png"]), "--scanpath", str(scanpath),
         "--max-tokens", "3", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(scanpath).size == (384, 384)
    result = runner.invoke(
        app, ["score", "is it yellow?", "-c", "yes", "-c", "no", "--image", str(image_files["jpeg"]), *common]
    )
    assert result.exit_code == 0, result.output


def recipe_counters(server) -> dict[str, float]:
    """The live server's visual-recipe pass counters and tiny-llava's token counters."""
    with urllib.request.urlopen(server["metrics_url"], timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    counters = {
        s.labels["recipe"]: s.value
        for s in families["attnserve_visual_recipe_passes"].samples
        if s.name.endswith("_total") and s.labels["model"] == "tiny-llava"
    }
    for family in ("attnserve_request_prompt_tokens", "attnserve_request_generation_tokens"):
        (counters[family],) = [
            s.value
            for s in families[family].samples
            if s.name.endswith("_total") and s.labels["model"] == "tiny-llava"
        ]
    return counters


def test_carve_over_the_wire_returns_the_answer_mask_and_crop(server, stub, image_files):
    data = image_files["png"].read_bytes()
    before = recipe_counters(server)
    tokens, complete = run(stub, image_chat(data, carve=vpb.CarveRecipe(pass_max_tokens=4)))
    after = recipe_counters(server)
    assert len(tokens) == 6 and complete.text == "".join(t.text for t in tokens)
    result = complete.visual_recipe
    assert result.passes == 3 and result.first_answer
    # Every pass counts: the two reading passes' tokens (4 generated each, at most) join the
    # final pass's 6, and their prompts (the image's 64 tokens each, at least) its prompt.
    assert after["carve"] - before["carve"] == 3 and after["visual_funnel"] == before["visual_funnel"]
    generated = after["attnserve_request_generation_tokens"] - before["attnserve_request_generation_tokens"]
    assert 6 + 2 <= generated <= 6 + 2 * 4
    prompt = after["attnserve_request_prompt_tokens"] - before["attnserve_request_prompt_tokens"]
    assert prompt >= complete.usage.prompt_tokens + 2 * 64
    assert [(r.start, r.end) for r in complete.image_tokens] == [(5, 69), (69, 133)]  # image and crop
    mask = Image.open(io.BytesIO(result.mask_png))
    assert mask.size == (64, 48) and mask.mode == "L"
    kept = [(x, y) for y in range(48) for x in range(64) if mask.getpixel((x, y))]
    assert 0 < len(kept) <= 0.2 * 48 * 48 + 48  # the top fifth of the seen 48 x 48 square (ties aside)
    (crop,) = result.crops
    xs, ys = [x for x, _ in kept], [y for _, y in kept]
    assert (crop.left, crop.top, crop.right, crop.bottom) == (min(xs), min(ys), max(xs) + 1, max(ys) + 1)
    picture = Image.open(io.BytesIO(crop.png))
    assert picture.width >= 64 and picture.height >= 48  # upscaled to cover the image


def test_visual_funnel_over_the_wire(stub, image_files):
    data = image_files["png"].read_bytes()
    recipe = vpb.VisualFunnelRecipe(crops=1, layers=[3], pass_max_tokens=2)
    tokens, complete = run(stub, image_chat(data, visual_funnel=recipe))
    result = complete.visual_recipe
    assert len(tokens) == 6 and result.passes == 2 and not result.mask_png
    assert 0 < result.attention_entropy <= 1
    (crop,) = result.crops
    side = round((0.25 + 0.5 * result.attention_entropy) * 48)
    assert (crop.right - crop.left, crop.bottom - crop.top) == (side, side)
    assert 0 <= crop.left and crop.right <= 64 and 0 <= crop.top and crop.bottom <= 48


def test_bad_recipe_fields_get_their_violation(stub, image_files):
    data = image_files["png"].read_bytes()
    text_only = pb.GenerateRequest(
        model="tiny-llava", chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="no image")])
    )
    cases = [
        (image_chat(data, carve=vpb.CarveRecipe(top_fraction=0)), "carve.top_fraction", "must be in (0, 1]"),
        (image_chat(data, carve=vpb.CarveRecipe(layers=[1, 9])), "carve.layers[1]", "9"),
        (image_chat(data, carve=vpb.CarveRecipe(min_components=0)), "carve.min_components", "[1, 1000]"),
        (image_chat(data, carve=vpb.CarveRecipe(pass_max_tokens=33)), "carve.pass_max_tokens", "[1, 32]"),
        (image_chat(data, carve=vpb.CarveRecipe(general_query="  ")), "carve.general_query", "some text"),
        (image_chat(data, data, carve=vpb.CarveRecipe()), "chat", "exactly one image (the chat has 2)"),
        (image_chat(data, model="smollm2", carve=vpb.CarveRecipe()), "carve", "not a vision-language model"),
        (image_chat(data, visual_funnel=vpb.VisualFunnelRecipe()), "visual_funnel.crops", "max_images of 2"),
        (
            image_chat(
                data, visual_funnel=vpb.VisualFunnelRecipe(crops=1, smallest_crop=0.8, largest_crop=0.5)
            ),
            "visual_funnel.largest_crop",
            "at least smallest_crop",
        ),
        (
            image_chat(data, visual_funnel=vpb.VisualFunnelRecipe(crops=1, smallest_crop=1.5)),
            "visual_funnel.smallest_crop",
            "must be in (0, 1]",
        ),
    ]
    no_image = pb.GenerateRequest()
    no_image.CopyFrom(text_only)
    no_image.carve.SetInParent()
    cases.append((no_image, "chat", "exactly one image (the chat has 0)"))
    for request, expected_field, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            run(stub, request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected_field
        violations = field_violations(caught.value)
        assert expected_field in violations, (expected_field, violations)
        assert message in violations[expected_field], violations


def test_cli_runs_carve_and_saves_the_mask_and_crop(server, image_files, tmp_path):
    from attnserve_client.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app,
        ["generate", "what is in the image?", "--image", str(image_files["png"]), "--recipe", "carve",
         "--recipe-out", str(tmp_path), "--max-tokens", "3", "--model", "tiny-llava",
         "--target", server["target"], "--timeout", "120"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "recipe: 3 passes" in result.output
    assert Image.open(tmp_path / "mask.png").size == (64, 48)
    assert Image.open(tmp_path / "crop-0.png").width >= 64


def test_a_recipe_cancelled_during_its_passes_leaves_the_server_serving(server, stub, image_files):
    import time

    data = image_files["png"].read_bytes()
    for delay in (0.02, 0.1, 0.3):  # in the reading passes, between them and the final pass, or later
        call = stub.Generate(image_chat(data, carve=vpb.CarveRecipe()), timeout=120)
        time.sleep(delay)
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
    tokens, complete = run(stub, image_chat(data, carve=vpb.CarveRecipe(pass_max_tokens=2)))
    assert len(tokens) == 6 and complete.visual_recipe.passes == 3
    log = server["log"].read_text()
    assert "Traceback" not in log and "never retrieved" not in log
