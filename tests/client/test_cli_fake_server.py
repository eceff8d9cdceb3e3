"""attnserve-cli against the fake service."""

import json

import pytest
from attnserve_client.cli import app
from fake_inference_service import ANSWER, NUM_LAYERS
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture
def cli(fake_target):
    def invoke(*args):
        return runner.invoke(app, [*args, "--target", fake_target])

    return invoke


def test_models_table(cli):
    result = cli("models")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split()[:3] == ["name", "kind", "engine"]
    assert row.split()[:4] == ["smollm2", "llm", "transformers", str(NUM_LAYERS)]


def test_model_description(cli):
    result = cli("model", "smollm2")
    assert result.exit_code == 0, result.output
    assert f"{NUM_LAYERS} layers" in result.stdout
    assert (
        "  0..29    language_model self causal, 9 heads, 3 kv heads, head dim 64: "
        "model.layers.0.self_attn .. model.layers.29.self_attn\n"
    ) in result.stdout
    assert "sink_calibration" in result.stdout
    assert "act: ACT on every layer" in result.stdout
    assert "max tokens" in result.stdout
    assert "sampling.temperature     0 or [0.01, 100]" in result.stdout
    assert "rpcs:        Generate, Score" in result.stdout
    assert "sink_calibration.tau     (0, 1)" in result.stdout


def test_unknown_model_fails_cleanly(cli):
    result = cli("model", "nope")
    assert result.exit_code == 1
    assert "error: NOT_FOUND" in result.stderr
    assert "Traceback" not in result.output


def test_generate_streams_text_and_readouts(cli, fake_service, tmp_path):
    heatmap = tmp_path / "rows.png"
    result = cli(
        "generate", "What is the capital of France?", "--temperature", "0", "--max-tokens", "16",
        "--stats", "--summary", "--attention-rows", "5:0", "--attention-rows", "6:1:0-1", "--logprobs", "2",
        "--heatmap", str(heatmap),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("".join(ANSWER) + "\n")
    assert "sink mass" in result.stdout and "France" in result.stdout
    assert "finish: eos" in result.stderr

    request = fake_service.requests[-1]
    assert request.chat.messages[0].content == "What is the capital of France?"
    assert list(request.readouts.attention_rows.steps) == [0, 1]
    assert request.sampling.top_logprobs == 2
    with Image.open(heatmap) as image:
        assert image.format == "PNG"


def test_generate_raw_with_intervention_flags_and_spec_file(cli, fake_service, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"presets": ["act"], "interventions": [{"layers": [1], "key_mask": {}}]}))
    result = cli(
        "generate", "--raw", "The capital of France is", "--spec", str(spec), "--preset", "other",
        "--sink-calibration", "3:0,2", "--tau", "0.2", "--emphasize", "0:4", "--alpha", "0.05",
    )  # fmt: skip
    assert result.exit_code == 0, result.output

    request = fake_service.requests[-1]
    assert request.prompt == "The capital of France is"
    assert list(request.interventions.presets) == ["act", "other"]
    operations = [i.WhichOneof("operation") for i in request.interventions.interventions]
    assert operations == ["key_mask", "sink_calibration", "key_emphasis"]
    assert not request.HasField("readouts")


def test_bad_request_names_the_field(cli):
    result = cli("generate", "hi", "--sink-calibration", "99")
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "interventions.interventions[0].selector.layers[0]: layer 99 is out of range" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sink-calibration", "x"], "layer list 'x'"),
        (["--emphasize", "5"], "token range '5'"),
        (["--heatmap", "out.png"], "--heatmap needs attention rows"),
        (["--spec", "missing.yaml"], "missing.yaml"),
    ],
)
def test_bad_flags_exit_2(cli, args, message):
    result = cli("generate", "hi", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_target_from_environment(fake_target):
    result = runner.invoke(app, ["models"], env={"ATTNSERVE_TARGET": fake_target})
    assert result.exit_code == 0, result.output


def test_score_table_marks_the_best_candidate(cli, fake_service):
    result = cli("score", "Is it?", "-c", "yes", "-c", "no way", "--preset", "act", "--raw")
    assert result.exit_code == 0, result.output
    header, first, second = result.stdout.splitlines()
    assert header.split() == ["candidate", "logprob", "tokens", "best"]
    assert first.split() == ["'yes'", "-0.3000", "1", "*"]
    assert second.split() == ["'no", "way'", "-0.6000", "2"]
    request = fake_service.requests[-1]
    assert request.prompt == "Is it?" and list(request.interventions.presets) == ["act"]


def test_score_refuses_readouts(cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("readouts: {layer_statistics: true}\n")
    result = cli("score", "Is it?", "-c", "yes", "--spec", str(spec))
    assert result.exit_code == 2
    assert "score takes no readouts" in result.output
