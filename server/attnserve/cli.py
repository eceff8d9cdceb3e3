"""The `attnserve` command."""

from __future__ import annotations

import asyncio
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import logs
from .calibration.headhunter import DEFAULT_PER_ROUND, DEFAULT_ROUNDS

app = typer.Typer(
    help="attnserve: LLM serving with per-request attention interventions.",
    no_args_is_help=True,
    add_completion=False,
)


class LogFormat(str, Enum):
    json = "json"
    text = "text"


class CalibrationMethod(str, Enum):
    sink_calibration = "sink-calibration"
    key_emphasis = "key-emphasis"
    headhunter = "headhunter"


class SearchStrategy(str, Enum):
    layer_sweep = "layer-sweep"
    head_sweep = "head-sweep"
    greedy = "greedy"


class CalibrationObjective(str, Enum):
    margin = "margin"
    accuracy = "accuracy"
    log_likelihood = "log-likelihood"


class GreedyUnit(str, Enum):
    layer = "layer"
    head = "head"


class CalibrationEngine(str, Enum):
    transformers = "transformers"
    vllm = "vllm"


#: The calibration commands' shared options.
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        help="Server config naming the model; default: the packaged config.", exists=True, dir_okay=False
    ),
]
PresetFile = Annotated[Path, typer.Option(help="Preset file to write (YAML).", dir_okay=False)]


@app.callback()
def main() -> None:
    """attnserve server commands."""


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            help="Server config (YAML or TOML); default: the packaged config.", exists=True, dir_okay=False
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one).")] = 50051,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port.")] = 9400,
    grace: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish on SIGTERM.")] = 25.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[LogFormat, typer.Option(help="json lines or plain text.")] = LogFormat.json,
) -> None:
    """Serve the models of a config over gRPC."""
    from .models.config import ConfigError, load_config
    from .server import serve as run

    logs.configure(log_level, log_format.value)
    try:
        server_config = load_config(config)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None
    status = asyncio.run(run(server_config, host=host, port=port, metrics_port=metrics_port, grace=grace))
    raise typer.Exit(status)


@app.command()
def calibrate(
    output: PresetFile,
    data: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Labelled examples, JSONL: {prompt | messages, candidates, answer[, split]} per line. "
            "Several files are several tasks: the search pools them and every task must pass the gate. "
            "Not with headhunter (--prompts).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    config: ConfigFile = None,
    model: Annotated[
        str | None, typer.Option(help="Model name in the config; default: its first model.")
    ] = None,
    method: Annotated[
        CalibrationMethod,
        typer.Option(
            help="Operation to place on heads; headhunter: SoftPAG heads of a diffusion model (HeadHunter)."
        ),
    ] = CalibrationMethod.sink_calibration,
    tau: Annotated[float, typer.Option(help="sink-calibration: column-mean threshold of a sink.")] = 0.1,
    beta: Annotated[float, typer.Option(help="sink-calibration: share of probability a sink keeps.")] = 0.4,
    min_queries: Annotated[
        list[int] | None,
        typer.Option(
            help="sink-calibration: a sink needs this many queries (0 = the authors' rule). "
            "Repeat to search each guard and keep the best on the calibration split."
        ),
    ] = None,
    alpha: Annotated[
        float, typer.Option(help="key-emphasis: factor on the selected keys' probabilities.")
    ] = 0.01,
    keys: Annotated[
        list[str] | None,
        typer.Option(help="key-emphasis: prompt token range START:END (half-open) of the keys; repeatable."),
    ] = None,
    invert_keys: Annotated[
        bool, typer.Option(help="key-emphasis: select the prompt keys outside --keys.")
    ] = False,
    search: Annotated[SearchStrategy, typer.Option(help="Search strategy.")] = SearchStrategy.layer_sweep,
    greedy_unit: Annotated[GreedyUnit, typer.Option(help="greedy: add whole layers or single heads.")] = (
        GreedyUnit.layer
    ),
    layers: Annotated[
        str | None,
        typer.Option(
            help="Layers to search, e.g. 2-29 or 3,5,8-10; default: every layer (headhunter: the "
            "self-attention layers among them)."
        ),
    ] = None,
    budget: Annotated[int, typer.Option(min=1, help="Most layers (or heads) in the chosen set.")] = 3,
    validation_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of examples held out when lines carry no split.")
    ] = 0.5,
    seed: Annotated[
        int,
        typer.Option(help="Seed of the split and of the bootstrap (headhunter: prompt i's image seed - i)."),
    ] = 0,
    engine: Annotated[
        CalibrationEngine,
        typer.Option(
            help="Engine that scores: transformers (loaded here) or vllm (started here with the "
            "model's vllm settings; the production engine, same results)."
        ),
    ] = CalibrationEngine.transformers,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Rows per forward (headhunter: image requests denoised together).")
    ] = 32,
    bootstrap_resamples: Annotated[int, typer.Option(min=100, help="Paired bootstrap resamples.")] = 2000,
    objective: Annotated[
        str | None,
        typer.Option(
            help="What the search maximises: margin (default), accuracy or log-likelihood; headhunter: "
            "clip-score (default, with --clip-model) or a callable module:function or file.py:function "
            "taking (images, prompts) and returning a score per image."
        ),
    ] = None,
    no_new_errors: Annotated[
        bool, typer.Option(help="Constraint: no calibration example may turn from right to wrong.")
    ] = False,
    folds: Annotated[
        int | None,
        typer.Option(
            help="k-fold cross-validation of the search with this many folds; 0: one held-out split. "
            "Default: 5 folds for files of 10-199 examples without a split field, else one split."
        ),
    ] = None,
    write_anyway: Annotated[
        bool,
        typer.Option(
            help="Write the preset even when the held-out evidence does not support it (the provenance "
            "records that it did not pass the gate)."
        ),
    ] = False,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="headhunter: prompts, one a line (or JSONL {prompt} lines); M is their number.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="headhunter: rounds R.")] = DEFAULT_ROUNDS,
    per_round: Annotated[int, typer.Option(help="headhunter: heads added per round k.")] = DEFAULT_PER_ROUND,
    u: Annotated[float, typer.Option(help="headhunter: SoftPAG's u on the heads, (1-u) A + u I.")] = 1.0,
    steps: Annotated[int, typer.Option(help="headhunter: denoising steps of each image.")] = 20,
    size: Annotated[int, typer.Option(help="headhunter: image side in pixels; 0: the model's default.")] = 0,
    guidance_scale: Annotated[float, typer.Option(help="headhunter: classifier-free guidance scale.")] = 7.5,
    pag_scale: Annotated[float, typer.Option(help="headhunter: PAG scale of the perturbed branch.")] = 3.0,
    clip_model: Annotated[
        Path | None,
        typer.Option(
            help="headhunter: local CLIP model directory for --objective clip-score.", file_okay=False
        ),
    ] = None,
) -> None:
    """Choose the layers and heads a method acts on from labelled examples; write a preset file.
    With --method headhunter: choose a diffusion model's SoftPAG heads by an image objective."""
    if method is CalibrationMethod.headhunter:
        from .calibration.headhunter_command import HeadHunterRequest, run_headhunter

        if data:
            _usage_error("headhunter searches over --prompts, not labelled data files")
        if prompts is None:
            _usage_error("--method headhunter needs --prompts FILE")
        request = HeadHunterRequest(
            prompts=prompts,
            output=output,
            config=config,
            model=model,
            objective=objective or "clip-score",
            clip_model=clip_model,
            rounds=rounds,
            per_round=per_round,
            u=u,
            steps=steps,
            size=size,
            guidance_scale=guidance_scale,
            pag_scale=pag_scale,
            seed=seed,
            batch_size=batch_size,
            layers=layers,
        )
        raise typer.Exit(run_headhunter(request))
    from .calibration.command import CalibrationRequest, run_calibration

    if not data:
        _usage_error("give one or more labelled data files (JSONL)")
    if prompts is not None or clip_model is not None:
        _usage_error("--prompts and --clip-model are for --method headhunter")
    objectives = [o.value for o in CalibrationObjective]
    if objective is not None and objective not in objectives:
        _usage_error(f"--objective: {objective!r} is not one of {', '.join(objectives)}")
    request = CalibrationRequest(
        data=tuple(data),
        output=output,
        config=config,
        model=model,
        operation=method.value.replace("-", "_"),
        tau=tau,
        beta=beta,
        min_queries=tuple(min_queries or (0,)),
        alpha=alpha,
        keys=tuple(keys or ()),
        invert_keys=invert_keys,
        strategy=search.value,
        greedy_unit=greedy_unit.value,
        layers=layers,
        budget=budget,
        validation_fraction=validation_fraction,
        seed=seed,
        batch_size=batch_size,
        bootstrap_resamples=bootstrap_resamples,
        write_anyway=write_anyway,
        folds=folds,
        objective=objective or CalibrationObjective.margin.value,
        no_new_errors=no_new_errors,
        engine=engine.value,
    )
    raise typer.Exit(run_calibration(request))


def _usage_error(message: str) -> None:
    typer.echo(f"calibrate: {message}", err=True)
    raise typer.Exit(2)


@app.command("calibrate-paint")
def calibrate_paint(
    data: Annotated[
        Path,
        typer.Argument(
            help='Image questions, JSONL: {"image": path (relative to the file), "question": text} per line.',
            exists=True,
            dir_okay=False,
        ),
    ],
    output: PresetFile,
    config: ConfigFile = None,
    model: Annotated[
        str | None, typer.Option(help="Vision-language model name in the config; default: its first model.")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(help="Language model layers to modulate, e.g. 2-31; default: PAINT's 2 to the last."),
    ] = None,
    alpha: Annotated[
        float, typer.Option(min=0.0, max=10.0, help="Rescale of local image tokens at gain 1.")
    ] = 0.7,
    beta: Annotated[
        float, typer.Option(min=0.0, max=10.0, help="Rescale of summary image tokens at gain 1.")
    ] = 0.3,
    gain_step: Annotated[float, typer.Option(min=0.05, max=10.0, help="Gains are multiples of this.")] = 0.5,
    max_gain: Annotated[float, typer.Option(min=0.05, max=20.0, help="Largest gain.")] = 2.0,
) -> None:
    """PAINT's head-specific modulation: measure each head's visual sensitivity on image questions
    and write a PAINT preset whose rescale scales with it (docs/attention-math.md#paint-head-gains)."""
    from .calibration.paint_heads import PaintCalibrationRequest, run_calibrate_paint

    request = PaintCalibrationRequest(
        data=data,
        output=output,
        config=config,
        model=model,
        layers=layers,
        alpha=alpha,
        beta=beta,
        step=gain_step,
        max_gain=max_gain,
    )
    raise typer.Exit(run_calibrate_paint(request))


if __name__ == "__main__":
    app()
