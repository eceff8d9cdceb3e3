"""`attnserve calibrate --method headhunter`: HeadHunter's greedy head search on a diffusion model
of the server config, with a progress display; writes a SoftPAG preset that requests name in
`pag.soft.preset`.

Exit status: 0 preset written; 2 bad config, prompts, objective or options.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..models.config import ModelConfig
from ..models.registry import ServedModel
from ..spec.errors import InvalidRequest
from ..spec.geometry import AttentionKind, ModelGeometry
from ..spec.ranges import PARAMETER_RANGES
from .command import UsageError, parse_layers
from .data import DataError, directory_sha256, file_sha256
from .headhunter import (
    DEFAULT_PER_ROUND,
    DEFAULT_ROUNDS,
    Head,
    HeadHunterResult,
    describe_heads,
    headhunter,
    heads_by_layer,
)
from .image_objectives import CLIP_SCORE, ImageObjective, ObjectiveError, load_objective
from .image_scorer import HeadSetScorer, ImageSettings, ScoringProgress
from .report import write_preset


@dataclass(frozen=True)
class HeadHunterRequest:
    """The command line's options (see cli.calibrate)."""

    #: Prompts, one a line, or JSONL lines {"prompt": ...}; M is their number.
    prompts: Path
    output: Path
    config: Path | None
    #: A diffusion model of the config; None: its first diffusion model.
    model: str | None
    #: "clip-score" or a callable "module:function" / "file.py:function".
    objective: str
    clip_model: Path | None
    rounds: int = DEFAULT_ROUNDS
    per_round: int = DEFAULT_PER_ROUND
    u: float = 1.0
    steps: int = 20
    #: Image side in pixels; 0: the model's default.
    size: int = 0
    guidance_scale: float = 7.5
    pag_scale: float = 3.0
    seed: int = 0
    #: Requests the engine denoises together.
    batch_size: int = 32
    #: "0,2" or "0-6": the self-attention layers among them are searched; None: every one.
    layers: str | None = None


def load_prompts(path: Path) -> list[str]:
    """Prompts of a text file (one a line) or of a .jsonl file ({"prompt": ...} a line); blank
    lines are skipped; errors name the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: {err}") from None
    prompts = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        if Path(path).suffix != ".jsonl":
            prompts.append(text.strip())
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON: {err}") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("prompt"), str)
            or not data["prompt"].strip()
        ):
            raise DataError(f'{path}:{number}: prompt: expected {{"prompt": "a non-empty string"}}')
        prompts.append(data["prompt"])
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def check_options(request: HeadHunterRequest) -> None:
    if request.rounds < 1:
        raise UsageError("--rounds: at least 1")
    if request.per_round < 1:
        raise UsageError("--per-round: at least 1")
    if not 0.0 < request.u <= 1.0:
        raise UsageError(f"--u: must be in (0, 1] (u = 0 perturbs nothing), got {request.u:g}")
    if not 0.0 < request.pag_scale <= 100.0:
        raise UsageError(
            f"--pag-scale: must be in (0, 100] (0 runs no perturbed branch), got {request.pag_scale:g}"
        )
    guidance = PARAMETER_RANGES["guidance_scale"]
    if request.guidance_scale not in guidance:
        raise UsageError(f"--guidance-scale: {guidance.describe()}, got {request.guidance_scale:g}")
    if request.size < 0 or request.size % 8:
        raise UsageError(f"--size: a multiple of 8 (0: the model's default), got {request.size}")
    if request.steps < 1:
        raise UsageError("--steps: at least 1")
    if request.batch_size < 1:
        raise UsageError("--batch-size: at least 1")


def candidate_heads(geometry: ModelGeometry, layers: str | None) -> list[Head]:
    """Every head of the self-attention layers among `layers` (default: all of them)."""
    wanted = parse_layers(layers, geometry.num_layers)
    selves = [geometry.layers[i] for i in wanted if geometry.layers[i].kind is AttentionKind.SELF]
    if not selves:
        raise UsageError(f"--layers: {layers!r} holds no self-attention layer; GetModel lists the layers")
    return [(layer.index, head) for layer in selves for head in range(layer.num_heads)]


def run_headhunter(request: HeadHunterRequest) -> int:
    console = Console(stderr=True)
    try:
        check_options(request)
        prompts = load_prompts(request.prompts)
        name, config, model_path = _diffusion_model(request, console)
        objective = load_objective(request.objective, request.clip_model, config.device)
        with _started(name, config, model_path, request.batch_size) as (model, loop):
            return _search(request, prompts, objective, model, model_path, loop, console)
    except (UsageError, DataError, ObjectiveError) as err:
        console.print(f"[red]calibrate:[/red] {err}", highlight=False)
        return 2
    except InvalidRequest as err:
        console.print(
            f"[red]calibrate:[/red] the server would refuse the search's requests (its limits are the "
            f"model's in the config): {err}",
            highlight=False,
        )
        return 2


def _diffusion_model(request: HeadHunterRequest, console: Console) -> tuple[str, ModelConfig, Path]:
    """(name, config, directory) of the diffusion model to search."""
    from ..models.config import ConfigError, load_config

    try:
        server_config = load_config(request.config)
        models = server_config.models
        diffusion = [name for name, m in models.items() if m.kind == "diffusion"]
        if request.model is None and not diffusion:
            raise UsageError("--model: the config has no diffusion model")
        name = request.model or diffusion[0]
        if name not in models:
            raise UsageError(f"--model: {name!r} is not in the config (it has {', '.join(models)})")
        config = models[name]
        if config.kind != "diffusion":
            raise UsageError(
                f"--model: {name!r} is a {config.kind} model; HeadHunter searches diffusion models"
            )
        model_path = config.resolve_path(server_config.cache_dir)
    except ConfigError as err:
        raise UsageError(f"config error: {err}") from None
    console.print(f"loading {name} from {model_path}")
    return name, config, model_path


@contextlib.contextmanager
def _started(
    name: str, config: ModelConfig, model_path: Path, batch_size: int
) -> Iterator[tuple[ServedModel, asyncio.AbstractEventLoop]]:
    """The model on a started diffusers engine, and the event loop it runs on."""
    from ..engines.diffusers.engine import DiffusersEngine  # torch and diffusers load here

    engine = DiffusersEngine(model_path, dtype=config.dtype, device=config.device, max_batch_size=batch_size)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.start())
    try:
        yield ServedModel(name, config.kind, config.engine, engine, config.limits, {}), loop
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()


def _search(
    request: HeadHunterRequest,
    prompts: list[str],
    objective: ImageObjective,
    model: ServedModel,
    model_path: Path,
    loop: asyncio.AbstractEventLoop,
    console: Console,
) -> int:
    engine = model.engine
    candidates = candidate_heads(engine.info.geometry, request.layers)
    height, width = engine.default_size
    settings = ImageSettings(
        width=request.size or width,
        height=request.size or height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        pag_scale=request.pag_scale,
        u=request.u,
        seed=request.seed,
    )
    console.print(
        f"HeadHunter: {len(candidates)} candidate heads, {request.rounds} rounds of {request.per_round}, "
        f"{len(prompts)} prompts, objective {request.objective}; images {settings.width}x{settings.height}, "
        f"{settings.steps} steps, batches of {request.batch_size} requests",
        highlight=False,
    )
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images, {task.fields[heads]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks: dict[str, int] = {}

        def on_progress(description: str, done: ScoringProgress) -> None:
            if description not in tasks:
                tasks[description] = progress.add_task(description, total=done.total_images, heads="")
            heads = f"{done.head_sets}/{done.total_head_sets} head sets scored"
            progress.update(tasks[description], completed=done.images, heads=heads)

        scorer = HeadSetScorer(model, prompts, settings, objective, loop, on_progress)
        result = headhunter(candidates, request.rounds, request.per_round, scorer)
    seconds = time.monotonic() - started

    description = summary(result, request, len(prompts))
    print(description)
    recorded = {
        "method": "headhunter (SoftPAG, arXiv 2506.10978)",
        "model": model.name,
        "model_files_sha256": directory_sha256(model_path),
        "prompts_file": str(request.prompts),
        "prompts_sha256": file_sha256(request.prompts),
        "prompts": str(len(prompts)),
        "objective": request.objective,
        **(
            {"clip_model": str(request.clip_model), "clip_model_sha256": directory_sha256(request.clip_model)}
            if request.objective == CLIP_SCORE
            else {}
        ),
        "rounds": str(request.rounds),
        "per_round": str(request.per_round),
        "u": repr(settings.u),
        "candidates": f"{len(candidates)} heads of layers {sorted({layer for layer, _ in candidates})}",
        "size": f"{settings.width}x{settings.height}",
        "steps": str(settings.steps),
        "guidance_scale": repr(settings.guidance_scale),
        "pag_scale": repr(settings.pag_scale),
        "seed": f"{settings.seed} (prompt i: seed + i)",
        "batch_size": str(request.batch_size),
        "heads": describe_heads(result.heads),
        "objective.baseline": repr(result.baseline),
        "objective.final": repr(result.final),
        **round_provenance(result),
        "search_seconds": f"{seconds:.1f}",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_preset(request.output, description, [preset_intervention(result.heads, settings.u)], recorded)
    console.print(
        f"wrote {request.output}; serve it by adding to the model's presets in the server config:\n"
        f"  presets:\n    - name: <name>\n      file: {request.output.resolve()}\n"
        f"and name it in requests: pag: {{scale: {settings.pag_scale:g}, soft: {{preset: <name>}}}}",
        highlight=False,
    )
    return 0


def preset_intervention(heads, u: float) -> dict:
    """The SoftPAG preset's one intervention (spec.guidance.soft_preset reads it back)."""
    return {
        "layer_heads": [{"layer": layer, "heads": hs} for layer, hs in heads_by_layer(heads).items()],
        "identity_blend": {"weight": u},
    }


def round_provenance(result: HeadHunterResult) -> dict[str, str]:
    """Per round: the heads added and every candidate's score at full precision."""
    out = {}
    for r in result.rounds:
        out[f"round.{r.number}.added"] = describe_heads(r.added)
        out[f"round.{r.number}.scores"] = " ".join(
            f"{layer}:{head}={score!r}" for (layer, head), score in r.scores
        )
    return out


def summary(result: HeadHunterResult, request: HeadHunterRequest, num_prompts: int) -> str:
    return (
        f"HeadHunter SoftPAG preset (u {request.u:g}): {len(result.heads)} heads "
        f"({describe_heads(result.heads)}) chosen in {len(result.rounds)} rounds of {request.per_round} "
        f"by {request.objective} over {num_prompts} prompts; mean objective {result.baseline:.4f} "
        f"without perturbation, {result.final:.4f} with SoftPAG (scale {request.pag_scale:g}) on them."
    )
