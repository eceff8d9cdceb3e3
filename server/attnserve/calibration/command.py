"""`attnserve calibrate`: load the model and data, search with a progress display, write the preset.

Exit status: 0 preset written; 1 nothing written, because no head set beat the unmodified model
on the calibration split or because the held-out evidence does not support the chosen one, on
all examples or on one task (the gate, calibration/calibrate.py CalibrationResult.passes_gate; --write-anyway writes it all the same and
records that it did not pass); 2 bad config, data or options.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..spec.errors import InvalidRequest
from ..spec.geometry import ModelGeometry
from .calibrate import SearchSettings, calibrate, cross_validate, provenance, summary
from .data import (
    DataError,
    LabelledExample,
    directory_sha256,
    file_sha256,
    fold_indices,
    load_tasks,
    split_examples,
    tasks_of,
)
from .method import Method, describe_head_set
from .objective import Scorer, TransformersScorer, tokenize
from .report import write_preset


@dataclass(frozen=True)
class CalibrationRequest:
    """The command line's options (see cli.calibrate)."""

    #: One JSONL file per task; with several, every task must pass the held-out gate.
    data: tuple[Path, ...]
    output: Path
    config: Path | None
    model: str | None
    #: "sink_calibration" or "key_emphasis".
    operation: str
    tau: float
    beta: float
    min_queries: tuple[int, ...]
    alpha: float
    #: "START:END" prompt token ranges.
    keys: tuple[str, ...]
    invert_keys: bool
    strategy: str
    greedy_unit: str
    #: "2-29", "3,5,8-10" or None for every layer.
    layers: str | None
    budget: int
    validation_fraction: float
    seed: int
    batch_size: int
    bootstrap_resamples: int
    #: A key of objective.OBJECTIVES.
    objective: str = "margin"
    #: Constraint: no calibration example may turn from right to wrong.
    no_new_errors: bool = False
    #: Write the preset even when it does not pass the held-out gate.
    write_anyway: bool = False
    #: k-fold cross-validation with this many folds; 0 one held-out split; None chooses
    #: (AUTO_FOLDS for small files without a split field).
    folds: int | None = None
    #: The engine that scores: "transformers" (the model loaded here) or "vllm" (the vLLM
    #: engine started here with the model's vllm settings).
    engine: str = "transformers"


#: Without --folds, files of MIN..MAX examples and no split field are cross-validated with
#: AUTO_FOLDS folds: a single split of a small set is a noisy judge, a large one is enough.
AUTO_FOLDS = 5
AUTO_FOLDS_MIN_EXAMPLES = 10
AUTO_FOLDS_MAX_EXAMPLES = 200


class UsageError(ValueError):
    """An option that cannot be used."""


def parse_layers(text: str | None, num_layers: int) -> tuple[int, ...]:
    """ "2-29" or "3,5,8-10" -> sorted layers; None -> every layer."""
    if text is None:
        return tuple(range(num_layers))
    layers: set[int] = set()
    for part in text.split(","):
        bounds = part.strip().split("-")
        try:
            numbers = [int(b) for b in bounds]
        except ValueError:
            raise UsageError(f"--layers: {part!r} is not a layer or a range like 2-29") from None
        if len(numbers) not in (1, 2) or numbers[0] > numbers[-1]:
            raise UsageError(f"--layers: {part!r} is not a layer or a range like 2-29")
        for layer in range(numbers[0], numbers[-1] + 1):
            if not 0 <= layer < num_layers:
                raise UsageError(
                    f"--layers: layer {layer} is out of range (this model has 0..{num_layers - 1})"
                )
            layers.add(layer)
    return tuple(sorted(layers))


def folds_of(request: CalibrationRequest, examples: Sequence[LabelledExample]) -> int:
    """The number of folds to cross-validate with; 0 for one held-out split."""
    has_split = any(e.split is not None for e in examples)
    if request.folds is None:
        small = AUTO_FOLDS_MIN_EXAMPLES <= len(examples) < AUTO_FOLDS_MAX_EXAMPLES
        return AUTO_FOLDS if small and not has_split else 0
    if request.folds == 1 or request.folds < 0:
        raise UsageError("--folds: use 0 (one held-out split) or 2 or more folds")
    if request.folds and has_split:
        raise UsageError(
            "--folds: a data file's split field fixes the held-out examples; remove it to cross-validate"
        )
    return request.folds


def methods_of(request: CalibrationRequest) -> list[Method]:
    """The method variants to search (one per --min-queries value for sink calibration)."""
    if request.operation == "sink_calibration":
        if request.keys or request.invert_keys:
            raise UsageError(
                "--keys and --invert-keys are for key-emphasis; sink calibration finds its own keys"
            )
        return [
            Method("sink_calibration", {"tau": request.tau, "beta": request.beta, "min_queries": guard})
            for guard in dict.fromkeys(request.min_queries)
        ]
    ranges = []
    for text in request.keys:
        try:
            start, end = (int(x) for x in text.split(":"))
        except ValueError:
            raise UsageError(f"--keys: {text!r} is not a token range START:END") from None
        ranges.append([start, end])
    keys = {"ranges": ranges, "invert": request.invert_keys} if ranges or request.invert_keys else None
    return [Method("key_emphasis", {"alpha": request.alpha}, keys)]


def run_calibration(request: CalibrationRequest) -> int:
    console = Console(stderr=True)
    try:
        with contextlib.ExitStack() as stack:  # the engine loaded for the run
            return _run(request, console, stack)
    except (UsageError, DataError, InvalidRequest) as err:
        console.print(f"[red]calibrate:[/red] {err}", highlight=False)
        return 2


def _run(request: CalibrationRequest, console: Console, stack: contextlib.ExitStack) -> int:
    from ..models.config import ConfigError, load_config

    try:
        server_config = load_config(request.config)
        models = server_config.models
        name = request.model or next(iter(models))
        if name not in models:
            raise UsageError(f"--model: {name!r} is not in the config (it has {', '.join(models)})")
        model_config = models[name]
        if model_config.kind != "llm":
            raise UsageError(
                f"--model: {name!r} is a {model_config.kind} model; calibration scores text answers"
            )
        model_path = model_config.resolve_path(server_config.cache_dir)
    except ConfigError as err:
        raise UsageError(f"config error: {err}") from None
    methods = methods_of(request)
    examples = load_tasks(request.data)
    num_folds = folds_of(request, examples)
    if num_folds:
        folds = fold_indices(examples, num_folds, request.seed)
        held_out = f"{num_folds}-fold cross-validation, seed {request.seed}"
    else:
        split = split_examples(examples, request.validation_fraction, request.seed)
        held_out = split.description

    console.print(f"loading {name} from {model_path} on the {request.engine} engine")
    loaded = _scorer(request, model_config, model_path, server_config.cache_dir)
    scorer, tokenizer, geometry = stack.enter_context(loaded)
    settings = SearchSettings(
        strategy=request.strategy,
        layers=parse_layers(request.layers, geometry.num_layers),
        budget=request.budget,
        greedy_unit=request.greedy_unit,
        objective=request.objective,
        no_new_errors=request.no_new_errors,
    )
    if num_folds:
        data = f"{len(examples)} examples, {held_out}"
    else:
        data = f"{len(split.calibration)} calibration and {len(split.validation)} validation examples"
    tasks = tasks_of(examples)
    if len(tasks) > 1:
        data += f" of {len(tasks)} tasks ({', '.join(tasks)}), each gated on its own"
    console.print(f"{data}; search: {settings.describe()}; batch size {request.batch_size}")

    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("answers"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks: dict[str, int] = {}

        def on_progress(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = progress.add_task(description, total=total)
            progress.update(tasks[description], completed=done)

        options = {
            "bootstrap_resamples": request.bootstrap_resamples,
            "seed": request.seed,
            "on_progress": on_progress,
        }
        if num_folds:
            result = cross_validate(
                scorer, geometry, methods, tokenize(examples, tokenizer), folds, settings, **options
            )
        else:
            calibration_set = tokenize(split.calibration, tokenizer)
            validation_set = tokenize(split.validation, tokenizer)
            result = calibrate(
                scorer, geometry, methods, calibration_set, validation_set, settings, **options
            )
    seconds = time.monotonic() - started

    for variant in result.variants:
        chosen = variant.search.chosen
        console.print(
            f"{json.dumps(dict(variant.method.parameters))}: best on {'all data' if num_folds else 'calibration'} "
            f"{describe_head_set(chosen.head_set)}, margin {variant.search.baseline.mean_margin:+.4f} -> "
            f"{chosen.metrics.mean_margin:+.4f} ({len(variant.search.trace)} head sets scored)",
            highlight=False,
        )
    if not result.found:
        console.print(
            "No head set beat the unmodified model on the examples searched; no preset written.",
            highlight=False,
        )
        return 1

    description = summary(result)
    print(description)
    if not result.passes_gate and not request.write_anyway:
        console.print(
            f"The held-out evidence does not support this head set ({result.gate}); no preset "
            "written. More examples narrow the interval; --write-anyway writes it all the same.",
            highlight=False,
        )
        return 1

    context = {
        "model": name,
        "model_files_sha256": directory_sha256(model_path),
        "data_file": ", ".join(map(str, request.data)),
        "data_sha256": ", ".join(file_sha256(path) for path in request.data),
        "split": held_out,
        "seed": str(request.seed),
        "search": settings.describe(),
        "engine": request.engine,
        "batch_size": str(request.batch_size),
        "search_seconds": f"{seconds:.1f}",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    method = result.chosen.method
    recorded = provenance(result, context)
    if not result.passes_gate:
        recorded["validation.gate"] += " (written with --write-anyway)"
    write_preset(request.output, description, [method.intervention(result.head_set)], recorded)
    console.print(
        f"wrote {request.output}; serve it by adding to the model's presets in the server config:\n"
        f"  presets:\n    - name: <name>\n      file: {request.output.resolve()}",
        highlight=False,
    )
    return 0


@contextlib.contextmanager
def _scorer(
    request: CalibrationRequest, model_config, model_path: Path, cache_dir: Path
) -> Iterator[tuple[Scorer, object, ModelGeometry]]:
    """(scorer, tokenizer, geometry) of the model on the requested engine."""
    if request.engine == "vllm":
        from .vllm_scorer import vllm_scorer  # vLLM loads here

        with vllm_scorer(
            model_path,
            dtype=model_config.dtype,
            device=model_config.device,
            batch_size=request.batch_size,
            settings=model_config.vllm,
            cache_dir=cache_dir,
        ) as scorer:
            info = scorer.engine.info
            if info.unsupported_reason:
                raise UsageError(
                    f"--engine vllm: this model takes no interventions there: {info.unsupported_reason}"
                )
            yield scorer, scorer.engine.tokenizer, info.geometry
        return
    from ..engines.hf.engine import load_causal_lm, model_geometry  # torch loads here
    from ..engines.prompts import pad_token_id

    tokenizer, model = load_causal_lm(model_path, dtype=model_config.dtype, device=model_config.device)
    yield (
        TransformersScorer(model, pad_id=pad_token_id(tokenizer), batch_size=request.batch_size),
        tokenizer,
        model_geometry(model),
    )
