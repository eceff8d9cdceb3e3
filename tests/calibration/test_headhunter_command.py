"""`attnserve calibrate --method headhunter` with a callable objective on the tiny pipeline: the
SoftPAG preset it writes (heads, u, provenance with every round's scores) loads from a server
config and compiles into SoftPAG on the chosen heads; bad options exit 2 naming the option."""

from __future__ import annotations

import json

import pytest
import yaml
from attnserve.cli import app
from attnserve.engines.diffusers.attention import unet_geometry
from attnserve.models.config import load_config
from attnserve.models.registry import preset_proto
from attnserve.spec.errors import Violations
from attnserve.spec.guidance import compile_guidance
from attnserve_client.v1 import image_generation_pb2 as gpb
from typer.testing import CliRunner

PROMPTS = ["a photo of a cat", "a red house"]

OBJECTIVE = """
import numpy as np

def brightness(images, prompts):
    assert prompts == {prompts!r}
    assert all(image.mode == "RGB" and image.size == (16, 16) for image in images)
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]

def one_score(images, prompts):
    return [0.0]
"""


@pytest.fixture
def files(tmp_path, tiny_sd_path):
    config = tmp_path / "server.yaml"
    models = [
        {"name": "tiny-sd", "kind": "diffusion", "engine": "diffusers", "path": str(tiny_sd_path)},
        {"name": "lm", "kind": "llm", "engine": "transformers", "path": str(tmp_path)},
    ]
    config.write_text(yaml.safe_dump({"models": models}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n\n")
    objective = tmp_path / "objective.py"
    objective.write_text(OBJECTIVE.format(prompts=PROMPTS))
    return {"config": config, "prompts": prompts, "objective": objective, "output": tmp_path / "hh.yaml"}


SMALL = ["--layers", "6", "--rounds", "2", "--per-round", "2", "--steps", "2", "--size", "16"]


def calibrate(files, *options):
    args = ["calibrate", "--config", str(files["config"]), "--output", str(files["output"]), *options]
    return CliRunner().invoke(app, args)


def test_headhunter_writes_a_soft_pag_preset_served_by_name(files, tiny_sd_path):
    result = calibrate(
        files,
        "--method",
        "headhunter",
        "--prompts",
        str(files["prompts"]),
        "--objective",
        f"{files['objective']}:brightness",
        "--u",
        "0.5",
        "--batch-size",
        "6",
        *SMALL,
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    preset = yaml.safe_load(files["output"].read_text())
    provenance = preset["provenance"]
    rounds = []
    for number in (1, 2):
        scores = {}
        for item in provenance[f"round.{number}.scores"].split():
            head, score = item.split("=")
            scores[tuple(map(int, head.split(":")))] = float(score)
        best = sorted(scores, key=lambda head: -scores[head])[:2]
        assert provenance[f"round.{number}.added"] == f"6:{','.join(str(h) for _, h in sorted(best))}"
        rounds.append(best)
    assert len(rounds[0] + rounds[1]) == 4 and not set(rounds[0]) & set(rounds[1])
    heads = sorted(h for _, h in rounds[0] + rounds[1])
    assert preset["interventions"] == [
        {"layer_heads": [{"layer": 6, "heads": heads}], "identity_blend": {"weight": 0.5}}
    ]
    assert {
        key: provenance[key] for key in ("prompts", "rounds", "per_round", "u", "size", "steps", "seed")
    } == {
        "prompts": "2",
        "rounds": "2",
        "per_round": "2",
        "u": "0.5",
        "size": "16x16",
        "steps": "2",
        "seed": "0 (prompt i: seed + i)",
    }
    assert provenance["objective"].endswith("objective.py:brightness")
    assert len(provenance["prompts_sha256"]) == 64 and len(provenance["model_files_sha256"]) == 64
    assert float(provenance["objective.final"]) > 0 and float(provenance["objective.baseline"]) > 0

    # The server config loads it; pag.soft.preset compiles into SoftPAG on those heads.
    served = files["config"].parent / "served.yaml"
    model = {"name": "tiny-sd", "kind": "diffusion", "engine": "diffusers", "path": str(tiny_sd_path)}
    model["presets"] = [{"name": "hh", "file": str(files["output"])}]
    served.write_text(yaml.safe_dump({"models": [model]}))
    loaded = load_config(served).models["tiny-sd"].presets["hh"]
    assert loaded.provenance["heads"] == f"6:{','.join(map(str, heads))}"
    proto = preset_proto("hh", loaded.description, loaded.interventions, loaded.provenance)
    from diffusers import UNet2DConditionModel

    geometry = unet_geometry(UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet"))
    violations = Violations()
    guidance = compile_guidance(
        gpb.PerturbedAttentionGuidance(soft=gpb.SoftPerturbation(preset="hh")),
        "pag",
        geometry,
        violations,
        {"hh": list(proto.interventions)},
    )
    assert violations.items == []
    [[op]] = guidance.layer_ops.values()
    assert list(guidance.layer_ops) == [6] and op.heads == tuple(heads) and op.op.weight == 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--method", "headhunter"], "--method headhunter needs --prompts FILE"),
        (["DATA", "--method", "headhunter", "--prompts", "PROMPTS"], "searches over --prompts, not labelled"),
        (["--method", "headhunter", "--prompts", "PROMPTS", "--objective", "margin"], "neither clip-score"),
        (["--method", "headhunter", "--prompts", "PROMPTS"], "clip-score needs --clip-model PATH"),
        (["--method", "headhunter", "--prompts", "PROMPTS", "--u", "0"], "--u: must be in (0, 1]"),
        (["--method", "headhunter", "--prompts", "PROMPTS", "--size", "12"], "--size: a multiple of 8"),
        (["--method", "headhunter", "--prompts", "PROMPTS", "--rounds", "0"], "--rounds: at least 1"),
        (["--method", "headhunter", "--prompts", "PROMPTS", "--pag-scale", "0"], "--pag-scale: must be in"),
        (
            ["--method", "headhunter", "--prompts", "PROMPTS", "--guidance-scale", "0.5"],
            "--guidance-scale: must",
        ),
        (
            [
                "--method",
                "headhunter",
                "--prompts",
                "PROMPTS",
                "--objective",
                "OBJ:brightness",
                "--size",
                "4096",
            ],
            "the server would refuse the search's requests (its limits are the model's in the config): width:",
        ),
        (["--method", "headhunter", "--prompts", "EMPTY", "--objective", "OBJ:brightness"], "no prompts"),
        (
            ["--method", "headhunter", "--prompts", "BAD", "--objective", "OBJ:brightness"],
            "bad.jsonl:2: prompt",
        ),
        (
            [
                "--method",
                "headhunter",
                "--prompts",
                "PROMPTS",
                "--objective",
                "OBJ:brightness",
                "--model",
                "lm",
            ],
            "'lm' is a llm model; HeadHunter searches diffusion models",
        ),
        (
            [
                "--method",
                "headhunter",
                "--prompts",
                "PROMPTS",
                "--objective",
                "OBJ:brightness",
                "--layers",
                "1",
            ],
            "--layers: '1' holds no self-attention layer",
        ),
        (
            ["--method", "headhunter", "--prompts", "PROMPTS", "--objective", "OBJ:one_score", *SMALL],
            "the objective returned 1 scores for 2 images",
        ),
        (["DATA", "--prompts", "PROMPTS"], "--prompts and --clip-model are for --method headhunter"),
        (["DATA", "--objective", "clip-score"], "--objective: 'clip-score' is not one of margin"),
        ([], "give one or more labelled data files"),
    ],
)
def test_bad_options_exit_2_naming_the_option(files, tmp_path, options, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    (tmp_path / "data.jsonl").write_text(
        '{"prompt": "2 + 2 =", "candidates": [" 4", " 5"], "answer": " 4"}\n'
    )
    names = {
        "DATA": str(tmp_path / "data.jsonl"),
        "PROMPTS": str(files["prompts"]),
        "EMPTY": str(tmp_path / "empty.txt"),
        "BAD": str(tmp_path / "bad.jsonl"),
    }
    args = [names.get(o, o).replace("OBJ", str(files["objective"])) for o in options]
    result = calibrate(files, *args)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert message in " ".join(result.output.split())
    assert not files["output"].exists()
