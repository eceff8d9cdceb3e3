"""The Python client and attnserve-cli against the real server with SmolLM2 (on each engine)."""

import pytest
from attnserve_client import AsyncClient, AttnserveError, Client
from attnserve_client.cli import app
from PIL import Image
from typer.testing import CliRunner

pytestmark = pytest.mark.e2e

MODEL = "smollm2"
QUESTION = "What is the capital of France?"
GREEDY = {"temperature": 0.0, "max_tokens": 16}
CALL_TIMEOUT_S = 300

runner = CliRunner()


@pytest.fixture
def target(server_target) -> str:
    return server_target


def _cli(target, *args):
    return runner.invoke(app, [*args, "--target", target, "--timeout", str(CALL_TIMEOUT_S)])


def test_sync_client(target):
    with Client(target, timeout=CALL_TIMEOUT_S) as client:
        assert MODEL in [m.name for m in client.list_models()]
        events = list(client.generate(MODEL, messages=[{"role": "user", "content": QUESTION}], **GREEDY))
        result = client.complete(MODEL, messages=[("user", QUESTION)], **GREEDY)

    streamed = "".join(e.token.text for e in events if e.HasField("token"))
    assert events[-1].HasField("complete")
    assert streamed == events[-1].complete.text
    assert "Paris" in result.text
    assert result.text == streamed  # greedy decoding is deterministic
    assert 0 < result.usage.completion_tokens <= GREEDY["max_tokens"]
    assert len(result.token_ids) == result.usage.completion_tokens
    assert result.finish_reason in ("eos", "length")


async def test_async_client(target):
    async with AsyncClient(target, timeout=CALL_TIMEOUT_S) as client:
        streamed = [
            e.token.text async for e in client.generate(MODEL, messages=[("user", QUESTION)], **GREEDY)
        ]
        result = await client.complete(MODEL, messages=[("user", QUESTION)], **GREEDY)
    assert "Paris" in "".join(streamed)
    assert "Paris" in result.text


def test_bad_request_has_field_violations(target):
    with Client(target, timeout=CALL_TIMEOUT_S) as client, pytest.raises(AttnserveError) as raised:
        client.complete(
            MODEL, prompt="hi", interventions={"interventions": [{"layers": [99], "sink_calibration": {}}]}
        )
    assert any("selector.layers" in v.field for v in raised.value.field_violations)


def test_cli_generate(target):
    result = _cli(target, "generate", "--model", MODEL, "--temperature", "0", "--max-tokens", "16", QUESTION)
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


def test_cli_heatmap(target, tmp_path):
    heatmap = tmp_path / "rows.png"
    result = _cli(
        target, "generate", "--model", MODEL, "--temperature", "0", "--max-tokens", "4",
        "--attention-rows", "5:0-1:0,1", "--heatmap", str(heatmap), QUESTION,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(heatmap) as image:
        assert image.format == "PNG"
        assert image.width > image.height > 0


def test_cli_bad_request_names_the_field(target):
    result = _cli(target, "generate", "--model", MODEL, "--sink-calibration", "99", QUESTION)
    assert result.exit_code != 0
    assert "INVALID_ARGUMENT" in result.stderr
    assert "selector.layers" in result.stderr
    assert "99" in result.stderr
    assert "Traceback" not in result.output
