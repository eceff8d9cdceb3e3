"""`attnserve calibrate-paint`: PAINT's head-specific modulation, calibrated on image questions.

Each example (an image and a question about it) is asked of the served model once, as a
one-token Generate request reading the last prompt row's attention in every chosen layer and
head (the row PAINT rescales). A head's visual sensitivity is the mean, over the examples, of
that row's mass on the image tokens; its gain is the sensitivity over the mean of all heads',
rounded and clipped (attention/paint.py paint_head_gains). The preset places PAINT's logit
rescale on each gain level's heads with alpha and beta times the gain
(docs/attention-math.md#paint-head-gains). The requests go through the API's own validation and
the configured engine, batched together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import readout_pb2

from ..attention.paint import paint_head_gains, visual_share
from .data import DataError, directory_sha256, file_sha256
from .method import heads_by_layer
from .report import write_preset

#: PAINT's defaults (the authors' code): rescale of local and summary image tokens.
ALPHA, BETA = 0.7, 0.3


@dataclass(frozen=True)
class ImageQuestion:
    image: Path
    question: str


@dataclass(frozen=True)
class PaintCalibrationRequest:
    """The command line's options (see cli.calibrate_paint)."""

    data: Path
    output: Path
    config: Path | None
    model: str | None
    #: Language model layers modulated, "2-31"; None: PAINT's 2..N-1.
    layers: str | None
    alpha: float = ALPHA
    beta: float = BETA
    #: Gains are multiples of step, at most max_gain.
    step: float = 0.5
    max_gain: float = 2.0


def load_image_questions(path: Path) -> list[ImageQuestion]:
    """JSONL, one {"image": path (relative to the file), "question": text} per line."""
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image, question = Path(item["image"]), str(item["question"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{number}: expected {{image, question}} ({err})") from None
        image = image if image.is_absolute() else Path(path).parent / image
        if not image.is_file():
            raise DataError(f"{path}:{number}: no image file {image}")
        examples.append(ImageQuestion(image, question))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def reading_request(model: str, example: ImageQuestion, layers: Sequence[int]) -> pb.GenerateRequest:
    """The example as a one-token request reading the prompt's last row in `layers`."""
    parts = [pb.ContentPart(image=example.image.read_bytes()), pb.ContentPart(text=example.question)]
    return pb.GenerateRequest(
        model=model,
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", parts=parts)]),
        sampling=pb.SamplingParams(max_tokens=1),
        readouts=readout_pb2.ReadoutSpec(attention_rows=readout_pb2.AttentionRowsSpec(layers=layers)),
    )


async def measure_sensitivity(
    served, examples: Sequence[ImageQuestion], layers: Sequence[int]
) -> torch.Tensor:
    """(len(layers), heads): each head's mean visual share over the examples, on a ServedModel
    whose engine is started. Every example is submitted at once, so the engine batches them."""
    from ..api.inputs import to_engine_request  # the API's own validation

    requests = [to_engine_request(reading_request(served.name, e, layers), served) for e in examples]

    async def shares(request) -> torch.Tensor:
        outputs = [out async for out in served.engine.generate(request)]
        rows = outputs[0].step_readouts["attention_rows"]
        image = torch.tensor([p for start, end in request.image_spans for p in range(start, end)])
        weights = torch.zeros(len(layers), max(r.head for r in rows) + 1, len(rows[0].weights))
        for row in rows:
            weights[layers.index(row.layer), row.head] = torch.tensor(row.weights)
        return visual_share(weights, image)

    return torch.stack(await asyncio.gather(*(shares(r) for r in requests))).mean(dim=0)


def gain_interventions(
    gains: torch.Tensor, layers: Sequence[int], alpha: float, beta: float
) -> list[dict[str, Any]]:
    """The preset: for each gain level (ascending), PAINT's two rescales on its heads, with
    alpha and beta times the gain."""
    interventions = []
    for level in sorted({g for g in gains.flatten().tolist() if g > 0}):
        heads = frozenset(
            (layer, head)
            for i, layer in enumerate(layers)
            for head in range(gains.shape[1])
            if gains[i, head] == level
        )
        for part, factor in (("paint_local", alpha), ("paint_summary", beta)):
            interventions.append(
                {
                    "layer_heads": [
                        {"layer": layer, "heads": list(hs)} for layer, hs in heads_by_layer(heads).items()
                    ],
                    "queries": "last",
                    "keys": {"image_tokens": {"tokens": part}},
                    "logit_rescale": {"alpha": round(factor * level, 6)},
                }
            )
    return interventions


def describe_sensitivity(sensitivity: torch.Tensor, layers: Sequence[int]) -> str:
    """ "2: 0.412 0.087; 3: ...": each layer's heads' sensitivities."""
    return "; ".join(
        f"{layer}: {' '.join(f'{s:.3f}' for s in row.tolist())}" for layer, row in zip(layers, sensitivity)
    )


async def run_paint_calibration(
    request: PaintCalibrationRequest, served, model_path: Path, layers: Sequence[int], on_message=print
) -> dict[str, Any]:
    """Measure on the started model, write the preset file; returns the preset's content."""
    examples = load_image_questions(request.data)
    on_message(
        f"measuring the visual share of {len(layers)} layers' heads on {len(examples)} image questions"
    )
    sensitivity = await measure_sensitivity(served, examples, layers)
    gains = paint_head_gains(sensitivity, step=request.step, max_gain=request.max_gain)
    interventions = gain_interventions(gains, layers, request.alpha, request.beta)
    levels = sorted({g for g in gains.flatten().tolist() if g > 0})
    description = (
        f"PAINT with head-specific gains {', '.join(f'{g:g}' for g in levels)} x (alpha {request.alpha}, "
        f"beta {request.beta}) by visual sensitivity, layers {layers[0]}-{layers[-1]}"
    )
    provenance = {
        "method": "paint head gains: gain = visual share / mean visual share, rounded, clipped",
        "model": served.name,
        "model_files_sha256": directory_sha256(model_path),
        "data_file": str(request.data),
        "data_sha256": file_sha256(request.data),
        "examples": str(len(examples)),
        "layers": f"{layers[0]}-{layers[-1]}",
        "alpha": str(request.alpha),
        "beta": str(request.beta),
        "gain_step": str(request.step),
        "max_gain": str(request.max_gain),
        "mean_visual_share": f"{sensitivity.mean().item():.4f}",
        "visual_share_by_head": describe_sensitivity(sensitivity, layers),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_preset(request.output, description, interventions, provenance)
    return {
        "description": description,
        "interventions": interventions,
        "provenance": provenance,
        "gains": gains,
    }


def run_calibrate_paint(request: PaintCalibrationRequest) -> int:
    """The command: 0 preset written, 2 bad config, data or options."""
    from rich.console import Console

    from ..models.config import ConfigError, load_config
    from .command import UsageError

    console = Console(stderr=True)
    try:
        config = load_config(request.config)
        name = request.model or next(iter(config.models))
        model_config = config.models.get(name)
        if model_config is None:
            raise UsageError(f"--model: {name!r} is not in the config (it has {', '.join(config.models)})")
        if model_config.kind != "vlm":
            raise UsageError(
                f"--model: {name!r} is a {model_config.kind} model; PAINT calibrates vision-language models"
            )
        model_path = model_config.resolve_path(config.cache_dir)
        load_image_questions(request.data)  # bad data fails before the model loads
        console.print(f"loading {name} from {model_path} on the {model_config.engine} engine")
        written = asyncio.run(_calibrate(request, config, model_config, model_path, console))
    except (ConfigError, UsageError, DataError) as err:
        console.print(f"[red]calibrate-paint:[/red] {err}", highlight=False)
        return 2
    print(written["description"])
    console.print(
        f"wrote {request.output}; serve it by adding to the model's presets in the server config:\n"
        f"  presets:\n    - name: <name>\n      file: {request.output.resolve()}",
        highlight=False,
    )
    return 0


async def _calibrate(request, config, model_config, model_path: Path, console) -> dict[str, Any]:
    from ..engines.registry import ENGINES
    from ..metrics import ServerMetrics
    from ..models.registry import ServedModel
    from .command import parse_layers

    engine = await asyncio.to_thread(
        ENGINES[model_config.engine].build, model_path, model_config, config, ServerMetrics()
    )
    await engine.start()
    try:
        num_layers = len(engine.info.geometry.language_model_layers)
        layers = parse_layers(request.layers, num_layers) if request.layers else tuple(range(2, num_layers))
        # The readout holds every head's row of every layer: no per-request readout limit here.
        limits = dataclasses.replace(model_config.limits, max_readout_values=2**62)
        served = ServedModel(model_config.name, model_config.kind, model_config.engine, engine, limits, {})
        return await run_paint_calibration(request, served, model_path, layers, console.print)
    finally:
        await engine.shutdown()
