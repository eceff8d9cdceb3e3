"""`attnserve calibrate-paint` on tiny-llava: each head's visual sensitivity measured through the
transformers engine equals transformers' own eager attention of the prompt's last row on the
image tokens; the preset written places PAINT's rescale with the gains of those sensitivities,
and a server config serves it by name."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
import torch
import yaml
from attnserve.api.inputs import to_engine_request
from attnserve.attention.paint import paint_head_gains
from attnserve.calibration.paint_heads import (
    gain_interventions,
    load_image_questions,
    measure_sensitivity,
    reading_request,
)
from attnserve.cli import app
from attnserve.engines.hf.engine import TransformersEngine
from attnserve.models.config import Limits, load_config
from attnserve.models.registry import ServedModel
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import intervention_pb2 as ipb
from PIL import Image
from typer.testing import CliRunner

QUESTIONS = {"red": "what is in the image?", "navy": "describe the picture.", "teal": "is there a square?"}
LAYERS = (2, 3)  # PAINT's 2..N-1 on tiny-llava's 4 layers


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paint-data")
    lines = []
    for i, (colour, question) in enumerate(QUESTIONS.items()):
        image = Image.new("RGB", (40 + 8 * i, 40), colour)
        image.paste((250, 250, 0), (4 + 6 * i, 4, 18 + 6 * i, 14))
        image.save(folder / f"{colour}.png")
        lines.append(json.dumps({"image": f"{colour}.png", "question": question}))
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "questions.jsonl"


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_llava_path, smollm2_path):
    config = {
        "models": [
            {"name": "tiny-llava", "kind": "vlm", "engine": "transformers", "path": str(tiny_llava_path)},
            {"name": "smollm2", "kind": "llm", "engine": "transformers", "path": str(smollm2_path)},
        ]
    }
    path = tmp_path_factory.mktemp("paint-config") / "attnserve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def eager_sensitivity(tiny_llava_path, data_file):
    """transformers' eager attention: the last prompt row's mass on the image tokens, per layer
    and head, averaged over the examples; with the prompt ids the processor makes."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_llava_path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_llava_path, local_files_only=True, attn_implementation="eager"
    ).eval()
    shares, prompts = [], []
    for example in load_image_questions(data_file):
        content = [{"type": "image"}, {"type": "text", "text": example.question}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        image = Image.open(io.BytesIO(example.image.read_bytes())).convert("RGB")
        inputs = processor(images=[image], text=text, return_tensors="pt")
        with torch.inference_mode():
            attentions = model(**inputs, output_attentions=True).attentions
        is_image = inputs["input_ids"][0] == model.config.image_token_id
        shares.append(torch.stack([attentions[layer][0, :, -1, is_image].sum(-1) for layer in LAYERS]))
        prompts.append(inputs["input_ids"][0].tolist())
    return torch.stack(shares).mean(0), prompts


def test_sensitivity_through_the_engine_equals_eager_attention(tiny_llava_path, data_file, eager_sensitivity):
    expected, prompts = eager_sensitivity
    examples = load_image_questions(data_file)

    async def measure():
        engine = TransformersEngine(tiny_llava_path, max_batch_size=8)
        await engine.start()
        try:
            served = ServedModel("tiny-llava", "vlm", "transformers", engine, Limits(), {})
            requests = [to_engine_request(reading_request("tiny-llava", e, LAYERS), served) for e in examples]
            return await measure_sensitivity(served, examples, LAYERS), requests
        finally:
            await engine.shutdown()

    sensitivity, requests = asyncio.run(measure())
    assert [list(r.prompt_token_ids) for r in requests] == prompts
    assert sensitivity.shape == (2, 2)
    torch.testing.assert_close(sensitivity, expected, atol=1e-5, rtol=0)
    assert (sensitivity > 0).all()


def test_the_command_writes_a_preset_the_server_serves_by_name(
    tmp_path, config_file, data_file, eager_sensitivity
):
    output = tmp_path / "paint-heads.yaml"
    result = CliRunner().invoke(
        app, ["calibrate-paint", str(data_file), "--output", str(output), "--config", str(config_file)]
    )
    assert result.exit_code == 0, result.output
    preset = yaml.safe_load(output.read_text())
    expected, _ = eager_sensitivity
    gains = paint_head_gains(expected, step=0.5, max_gain=2.0)
    assert preset["interventions"] == gain_interventions(gains, LAYERS, 0.7, 0.3)
    # Each gain level's heads get PAINT's rescale times the gain, local and summary.
    for intervention in preset["interventions"]:
        for unit in intervention["layer_heads"]:
            for head in unit["heads"]:
                gain = gains[LAYERS.index(unit["layer"]), head].item()
                factor = 0.7 if intervention["keys"]["image_tokens"]["tokens"] == "paint_local" else 0.3
                assert intervention["logit_rescale"]["alpha"] == pytest.approx(factor * gain)
    provenance = preset["provenance"]
    assert provenance["model"] == "tiny-llava" and provenance["examples"] == "3"
    assert provenance["layers"] == "2-3" and len(provenance["data_sha256"]) == 64

    served_config = yaml.safe_load(config_file.read_text())
    served_config["models"][0]["presets"] = [{"name": "paint-heads", "file": str(output)}]
    (tmp_path / "served.yaml").write_text(yaml.safe_dump(served_config))
    model_config = load_config(tmp_path / "served.yaml").models["tiny-llava"]
    assert list(model_config.presets["paint-heads"].interventions) == preset["interventions"]


def test_a_request_naming_the_preset_runs(tmp_path, tiny_llava_path, data_file):
    """The preset's interventions are a valid request on the model (within its default limits)."""
    from attnserve.models.registry import preset_proto

    output = tmp_path / "p.yaml"
    config = {
        "models": [
            {"name": "tiny-llava", "kind": "vlm", "engine": "transformers", "path": str(tiny_llava_path)}
        ]
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    args = ["calibrate-paint", str(data_file), "--output", str(output), "--config", str(tmp_path / "c.yaml")]
    assert CliRunner().invoke(app, [*args, "--max-gain", "4", "--gain-step", "1"]).exit_code == 0
    preset = yaml.safe_load(output.read_text())

    async def generate():
        engine = TransformersEngine(tiny_llava_path, max_batch_size=4)
        await engine.start()
        try:
            presets = {"paint-heads": preset_proto("paint-heads", "", preset["interventions"], {})}
            served = ServedModel("tiny-llava", "vlm", "transformers", engine, Limits(), presets)
            example = load_image_questions(data_file)[0]
            request = reading_request("tiny-llava", example, [2])
            request.ClearField("readouts")
            request.interventions.CopyFrom(ipb.InterventionSpec(presets=["paint-heads"]))
            request.sampling.CopyFrom(pb.SamplingParams(max_tokens=3, ignore_eos=True))
            engine_request = to_engine_request(request, served)
            return engine_request, [out.token_id async for out in engine.generate(engine_request)]
        finally:
            await engine.shutdown()

    engine_request, tokens = asyncio.run(generate())
    assert engine_request.plan.applied_operations and len(tokens) == 3


@pytest.mark.parametrize(
    ("line", "model", "message"),
    [
        ('{"image": "missing.png", "question": "q"}', "tiny-llava", "no image file"),
        ('{"question": "q"}', "tiny-llava", "expected {image, question}"),
        ('{"image": "red.png", "question": "q"}', "smollm2", "is a llm model"),
        ('{"image": "red.png", "question": "q"}', "nope", "is not in the config"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, config_file, data_file, line, model, message):
    bad = data_file.parent / f"bad-{abs(hash((line, model)))}.jsonl"
    bad.write_text(line + "\n")
    args = ["calibrate-paint", str(bad), "--output", str(tmp_path / "p.yaml"), "--config", str(config_file)]
    result = CliRunner().invoke(app, [*args, "--model", model])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "p.yaml").exists()
