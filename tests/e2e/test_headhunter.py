"""`attnserve calibrate --method headhunter` with the built-in clip-score objective (a tiny CLIP)
on the tiny Stable-Diffusion pipeline, then the SoftPAG preset served by name on a real server:
GetModel lists it with its provenance, `pag.soft.preset` gives the images its heads give when
sent explicitly (bit-identical PNGs), those images reproduce the recorded objective, and a bad
name is INVALID_ARGUMENT on pag.soft.preset."""

from __future__ import annotations

import io
import subprocess
import sys

import grpc
import pytest
import yaml
from attnserve.calibration.image_objectives import ClipScore
from attnserve_client.cli import app
from attnserve_client.v1 import image_generation_pb2 as ipb
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2
from PIL import Image
from typer.testing import CliRunner

from .conftest import running_server
from .helpers import field_violations

pytestmark = pytest.mark.e2e

PRESET = "headhunter-quality"
PROMPTS = ["a photo of a cat", "a red house on a hill", "a painting of a river"]
#: Two self-attention layers (16 heads), two rounds of two, tiny images: about a minute.
SEARCH = [
    "--layers",
    "4,6",
    "--rounds",
    "2",
    "--per-round",
    "2",
    "--steps",
    "2",
    "--size",
    "16",
    "--u",
    "0.5",
]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_sd_path, tiny_clip_path):
    folder = tmp_path_factory.mktemp("headhunter")
    model = {"name": "tiny-sd", "kind": "diffusion", "engine": "diffusers", "path": str(tiny_sd_path)}
    (folder / "plain.yaml").write_text(yaml.safe_dump({"models": [model]}))
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    preset_file = folder / "headhunter.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "attnserve.cli", "calibrate", "--method", "headhunter"]
        + ["--config", str(folder / "plain.yaml"), "--prompts", str(folder / "prompts.txt")]
        + ["--objective", "clip-score", "--clip-model", str(tiny_clip_path), "--output", str(preset_file)]
        + SEARCH,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HeadHunter SoftPAG preset" in result.stdout
    served = folder / "served.yaml"
    served.write_text(
        yaml.safe_dump({"models": [{**model, "presets": [{"name": PRESET, "file": str(preset_file)}]}]})
    )
    return {"preset": yaml.safe_load(preset_file.read_text()), "config": served, "folder": folder}


@pytest.fixture(scope="module")
def server(calibrated):
    with running_server(calibrated["config"], calibrated["folder"] / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server["target"]) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def generate(stub, prompt_index: int, soft: ipb.SoftPerturbation | None) -> bytes:
    request = ipb.GenerateImageRequest(
        model="tiny-sd", prompt=PROMPTS[prompt_index], width=16, height=16, steps=2, seed=prompt_index
    )
    if soft is not None:
        request.pag.CopyFrom(ipb.PerturbedAttentionGuidance(scale=3.0, soft=soft))
    [complete] = [r.complete for r in stub.GenerateImage(request, timeout=120) if r.HasField("complete")]
    return complete.images[0].png


def test_the_preset_file_holds_the_chosen_heads_and_the_search(calibrated, tiny_clip_path):
    preset = calibrated["preset"]
    [intervention] = preset["interventions"]
    assert intervention["identity_blend"] == {"weight": 0.5}
    layers = {lh["layer"] for lh in intervention["layer_heads"]}
    assert layers <= {4, 6} and sum(len(lh["heads"]) for lh in intervention["layer_heads"]) == 4
    provenance = preset["provenance"]
    assert provenance["objective"] == "clip-score"
    assert provenance["clip_model"] == str(tiny_clip_path) and len(provenance["clip_model_sha256"]) == 64
    assert provenance["prompts"] == "3" and provenance["candidates"] == "16 heads of layers [4, 6]"
    assert len(provenance["round.1.scores"].split()) == 16 and len(provenance["round.2.scores"].split()) == 14
    for key in ("objective.baseline", "objective.final"):
        assert -1.0 <= float(provenance[key]) <= 1.0  # a cosine


def test_get_model_lists_the_preset_with_its_provenance(stub, calibrated):
    model = stub.GetModel(pb.GetModelRequest(name="tiny-sd")).model
    [preset] = [p for p in model.presets if p.name == PRESET]
    assert dict(preset.provenance) == calibrated["preset"]["provenance"]
    assert preset.description == calibrated["preset"]["description"]
    [intervention] = preset.interventions
    assert (
        intervention.WhichOneof("operation") == "identity_blend" and intervention.identity_blend.weight == 0.5
    )


def test_the_preset_by_name_equals_its_heads_sent_explicitly(stub, calibrated, tiny_clip_path):
    [intervention] = calibrated["preset"]["interventions"]
    explicit = ipb.SoftPerturbation(
        heads=[
            intervention_pb2.LayerHeads(layer=lh["layer"], heads=lh["heads"])
            for lh in intervention["layer_heads"]
        ],
        u=0.5,
    )
    by_name = [generate(stub, i, ipb.SoftPerturbation(preset=PRESET)) for i in range(len(PROMPTS))]
    assert by_name == [generate(stub, i, explicit) for i in range(len(PROMPTS))]
    assert by_name != [generate(stub, i, None) for i in range(len(PROMPTS))]
    # The served images reproduce the objective the search recorded for the chosen heads (the
    # search denoised them batched, where a pixel may round one level off).
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in by_name]
    scores = ClipScore(tiny_clip_path)(images, PROMPTS)
    recorded = float(calibrated["preset"]["provenance"]["objective.final"])
    assert sum(scores) / len(scores) == pytest.approx(recorded, abs=1e-4)


def test_the_client_cli_names_the_preset(server, stub, tmp_path):
    args = ["generate-image", PROMPTS[1], "-m", "tiny-sd", "--width", "16", "--height", "16", "--steps", "2"]
    args += ["--seed", "1", "--pag-scale", "3", "--soft-pag-preset", PRESET, "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--target", server["target"], "--timeout", "120"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "image-0.png").read_bytes() == generate(stub, 1, ipb.SoftPerturbation(preset=PRESET))


@pytest.mark.parametrize(
    ("soft", "field"),
    [
        (ipb.SoftPerturbation(preset="no-such-preset"), "pag.soft.preset"),
        (ipb.SoftPerturbation(preset=PRESET, heads=[intervention_pb2.LayerHeads(layer=6)]), "pag.soft.heads"),
    ],
)
def test_bad_preset_requests_name_the_field(stub, soft, field):
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, 0, soft)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(err.value)
