"""attnserve-cli: list models, describe one, generate with interventions and readouts, and score
candidate answers."""

from __future__ import annotations

import contextlib
import enum
import pathlib
import sys
from collections.abc import Iterator
from typing import Annotated, NoReturn

import grpc
import typer

from attnserve_client import formatting
from attnserve_client.client import DEFAULT_TARGET, Client
from attnserve_client.errors import AttnserveError
from attnserve_client.flags import specs_from_flags
from attnserve_client.heatmap import write_heatmap
from attnserve_client.image_map import write_image_maps, write_scanpaths
from attnserve_client.spec import SpecError, load_spec_file, specs_from_dict
from attnserve_client.v1 import inference_service_pb2 as service_pb2
from attnserve_client.v1 import intervention_pb2, readout_pb2
from attnserve_client.word_heatmap import write_images

app = typer.Typer(
    help="Command-line client of attnserve.", no_args_is_help=True, pretty_exceptions_show_locals=False
)

Target = Annotated[str, typer.Option(envvar="ATTNSERVE_TARGET", help="Server address, host:port.")]
Timeout = Annotated[float | None, typer.Option(help="Deadline of the call in seconds.")]


class Recipe(enum.StrEnum):
    """Visual recipes the server runs; the value is the GenerateRequest field."""

    carve = "carve"
    visual_funnel = "visual_funnel"


INTERVENTIONS = "Interventions"
READOUTS = "Readouts"
SAMPLING = "Sampling"

# Options generate and score share.
Prompt = Annotated[str, typer.Argument(help="The prompt; - reads it from stdin.")]
Model = Annotated[str, typer.Option("--model", "-m", help="Served model name.")]
Chat = Annotated[
    bool, typer.Option("--chat/--raw", help="Send the prompt as a user chat message, or as raw text.")
]
System = Annotated[str | None, typer.Option(help="A system message before the prompt (chat only).")]
Images = Annotated[
    list[pathlib.Path] | None,
    typer.Option(
        "--image",
        exists=True,
        dir_okay=False,
        help="A PNG, JPEG or WebP file placed before the prompt (repeatable; vision-language models, chat only).",
    ),
]
Presets = Annotated[
    list[str] | None, typer.Option(help="Server preset (repeatable).", rich_help_panel=INTERVENTIONS)
]
SinkCalibration = Annotated[
    list[str] | None,
    typer.Option(
        metavar="LAYERS[:HEADS]",
        help="ACT sink calibration of these layers' heads (every head without HEADS), e.g. 3-5:0,2 (repeatable).",
        rich_help_panel=INTERVENTIONS,
    ),
]
Tau = Annotated[
    float | None, typer.Option(help="Sink threshold of --sink-calibration.", rich_help_panel=INTERVENTIONS)
]
Beta = Annotated[
    float | None,
    typer.Option(help="Share a sink keeps, for --sink-calibration.", rich_help_panel=INTERVENTIONS),
]


@app.callback()
def connection(
    context: typer.Context,
    token: Annotated[
        str | None, typer.Option(envvar="ATTNSERVE_TOKEN", help="Bearer token the server checks.")
    ] = None,
    tls_ca: Annotated[
        pathlib.Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Use TLS, trusting the server certificates this CA signed."
        ),
    ] = None,
    tls_cert: Annotated[
        pathlib.Path | None,
        typer.Option(exists=True, dir_okay=False, help="Client certificate for mTLS (with --tls-key)."),
    ] = None,
    tls_key: Annotated[
        pathlib.Path | None, typer.Option(exists=True, dir_okay=False, help="Client certificate's key.")
    ] = None,
) -> None:
    """How to reach the server: TLS and a token, for every command."""
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    credentials = None
    if tls_ca is not None or tls_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls_ca.read_bytes() if tls_ca else None,
            private_key=tls_key.read_bytes() if tls_key else None,
            certificate_chain=tls_cert.read_bytes() if tls_cert else None,
        )
    context.obj = {"credentials": credentials, "token": token}


def _client(context: typer.Context, target: str, timeout: float | None) -> Client:
    """A client with the connection options of the command line (connection())."""
    return Client(target, timeout=timeout, **(context.find_root().obj or {}))


@app.command()
def models(context: typer.Context, target: Target = DEFAULT_TARGET, timeout: Timeout = None) -> None:
    """List the served models."""
    with _errors_reported(), _client(context, target, timeout) as client:
        typer.echo(formatting.models_table(client.list_models()))


@app.command()
def model(
    context: typer.Context, name: str, target: Target = DEFAULT_TARGET, timeout: Timeout = None
) -> None:
    """Describe a model: geometry, operations, readouts, presets and limits."""
    with _errors_reported(), _client(context, target, timeout) as client:
        typer.echo(formatting.model_description(client.get_model(name)))


@app.command()
def generate(
    context: typer.Context,
    prompt: Prompt,
    model: Model = "smollm2",
    chat: Chat = True,
    system: System = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, rich_help_panel=SAMPLING)] = None,
    temperature: Annotated[
        float | None, typer.Option(min=0, help="0 is greedy.", rich_help_panel=SAMPLING)
    ] = None,
    top_p: Annotated[float | None, typer.Option(rich_help_panel=SAMPLING)] = None,
    top_k: Annotated[int | None, typer.Option(min=0, rich_help_panel=SAMPLING)] = None,
    seed: Annotated[int | None, typer.Option(min=0, rich_help_panel=SAMPLING)] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop string (repeatable).", rich_help_panel=SAMPLING)
    ] = None,
    logprobs: Annotated[
        int, typer.Option(min=0, help="Show the N most likely tokens of each step.", rich_help_panel=SAMPLING)
    ] = 0,
    preset: Presets = None,
    sink_calibration: SinkCalibration = None,
    tau: Tau = None,
    beta: Beta = None,
    emphasize: Annotated[
        list[str] | None,
        typer.Option(
            metavar="START:END",
            help="PASTA: emphasise prompt tokens [START, END) by down-weighting every other prompt token (repeatable).",
            rich_help_panel=INTERVENTIONS,
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(help="Weight of the other tokens, for --emphasize.", rich_help_panel=INTERVENTIONS),
    ] = None,
    spec: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="JSON or YAML spec file (presets, interventions, readouts).", rich_help_panel=INTERVENTIONS
        ),
    ] = None,
    stats: Annotated[
        bool, typer.Option("--stats", help="Per-layer attention statistics.", rich_help_panel=READOUTS)
    ] = False,
    summary: Annotated[
        bool, typer.Option("--summary", help="Where the model looked, in words.", rich_help_panel=READOUTS)
    ] = False,
    attention_rows: Annotated[
        list[str] | None,
        typer.Option(
            metavar="LAYER:HEAD[:STEP]",
            help="Attention rows to read out, e.g. 5:0 or 5:0-3:0,1 (repeatable; step 0 is the prefill).",
            rich_help_panel=READOUTS,
        ),
    ] = None,
    heatmap: Annotated[
        pathlib.Path | None,
        typer.Option(help="Write the attention rows as a PNG heatmap.", rich_help_panel=READOUTS),
    ] = None,
    image: Images = None,
    image_map: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="Draw where the model looked in each --image (mean over every layer, head and step) "
            "as a PNG over it (PATH-<k>.png for several images).",
            rich_help_panel=READOUTS,
        ),
    ] = None,
    scanpath: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="Draw the scanpath (the most attended image patch of each step, mean over every layer "
            "and head) over each --image as numbered points (PATH-<k>.png for several images).",
            rich_help_panel=READOUTS,
        ),
    ] = None,
    recipe: Annotated[
        Recipe | None,
        typer.Option(
            help="Let the server run a visual recipe on the --image (authors' defaults) and stream its final answer.",
            rich_help_panel=READOUTS,
        ),
    ] = None,
    recipe_out: Annotated[
        pathlib.Path | None,
        typer.Option(
            help="Folder to save the recipe's crops (crop-<k>.png) and CARVE's mask (mask.png) in.",
            rich_help_panel=READOUTS,
        ),
    ] = None,
    target: Target = DEFAULT_TARGET,
    timeout: Timeout = None,
) -> None:
    """Generate text, streaming it as it arrives."""
    inputs = _inputs(prompt, chat, system, image)
    with _errors_reported():
        interventions, readouts = _specs(
            spec, preset, sink_calibration, tau, beta, emphasize, alpha, stats, summary, attention_rows
        )
        if heatmap is not None and not readouts.attention_rows.layers:
            raise SpecError("--heatmap needs attention rows: add --attention-rows LAYER:HEAD[:STEP]")
        if image_map is not None:
            if not image:
                raise SpecError("--image-map needs an --image")
            readouts.image_attention.layer_names.append("*")
        if scanpath is not None:
            if not image:
                raise SpecError("--scanpath needs an --image")
            readouts.scanpath.layer_names.append("*")
        if recipe_out is not None and recipe is None:
            raise SpecError("--recipe-out needs a --recipe")
        recipes = {recipe.value: {}} if recipe else {}
        with _client(context, target, timeout) as client:
            stream = client.generate(
                model, **inputs, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                seed=seed, stop=stop or (), top_logprobs=logprobs, interventions=interventions,
                readouts=readouts if readouts.ByteSize() else None, **recipes,
            )  # fmt: skip
            tokens, complete = _print_stream(stream)
            grid_size = client.get_model(model).vision.grid_size if scanpath is not None else 0

    if logprobs:
        typer.echo("\n" + formatting.top_logprobs_table(tokens))
    if complete.layer_statistics:
        typer.echo("\n" + formatting.layer_statistics_table(complete.layer_statistics))
    if complete.HasField("summary"):
        typer.echo("\n" + complete.summary.text)
    if heatmap is not None:
        rows = [row for t in tokens for row in t.attention_rows]
        if not rows:
            _fail("the server returned no attention rows; no heatmap written")
        key_tokens = [*complete.prompt_token_texts, *(t.text for t in tokens)]
        width, height = write_heatmap(rows, heatmap, key_tokens=key_tokens)
        typer.echo(f"wrote {heatmap} ({len(rows)} rows, {width}x{height} px)", err=True)
    if image_map is not None:
        maps = [m for t in tokens for m in t.image_attention]
        if not maps:
            _fail("the server returned no image attention maps; no image map written")
        for path in write_image_maps([p.read_bytes() for p in image], maps, image_map):
            typer.echo(f"wrote {path}", err=True)
    if scanpath is not None:
        if not complete.scanpath:
            _fail("the server returned no scanpath; none drawn")
        for path in write_scanpaths([p.read_bytes() for p in image], complete.scanpath, grid_size, scanpath):
            typer.echo(f"wrote {path}", err=True)
    if complete.HasField("visual_recipe"):
        _report_recipe(complete.visual_recipe, recipe_out)
    typer.echo(formatting.completion_footer(complete), err=True)


def _report_recipe(result, folder: pathlib.Path | None) -> None:
    """The recipe's passes, first answer and crop boxes on stderr; its images saved in folder."""
    boxes = ", ".join(f"({c.left}, {c.top}, {c.right}, {c.bottom})" for c in result.crops)
    typer.echo(
        f"recipe: {result.passes} passes; first answer: {result.first_answer!r}; crops: {boxes}", err=True
    )
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"crop-{k}.png": crop.png for k, crop in enumerate(result.crops)}
    if result.mask_png:
        files["mask.png"] = result.mask_png
    for name, data in files.items():
        (folder / name).write_bytes(data)
        typer.echo(f"wrote {folder / name}", err=True)


@app.command("generate-image")
def generate_image(
    context: typer.Context,
    prompt: Prompt,
    model: Annotated[str, typer.Option("--model", "-m", help="A diffusion model the server serves.")],
    out: Annotated[
        pathlib.Path, typer.Option(help="Directory for image-<k>.png and image-<k>-<word>.png.")
    ] = pathlib.Path("."),
    negative_prompt: Annotated[str, typer.Option(help="What the image should not show.")] = "",
    width: Annotated[int | None, typer.Option(min=8, help="Pixels; default the model's.")] = None,
    height: Annotated[int | None, typer.Option(min=8, help="Pixels; default the model's.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps; default 50.")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Classifier-free guidance; default 7.5.")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    num_images: Annotated[int | None, typer.Option(min=1)] = None,
    pag_scale: Annotated[
        float | None,
        typer.Option(help="Perturbed-attention guidance with this scale.", rich_help_panel=INTERVENTIONS),
    ] = None,
    pag_layer: Annotated[
        list[str] | None,
        typer.Option(
            help="PAG layer id (repeatable, e.g. mid); default the server's.", rich_help_panel=INTERVENTIONS
        ),
    ] = None,
    soft_pag_preset: Annotated[
        str | None,
        typer.Option(
            help="SoftPAG on the heads of this SoftPAG preset (GetModel lists them; attnserve calibrate "
            "--method headhunter writes them).",
            rich_help_panel=INTERVENTIONS,
        ),
    ] = None,
    preset: Presets = None,
    word: Annotated[
        list[str] | None,
        typer.Option(
            help="Prompt word whose heatmap to draw over the images (repeatable).", rich_help_panel=READOUTS
        ),
    ] = None,
    content_word: Annotated[
        list[str] | None,
        typer.Option(
            help="Content word of the prompt (repeatable; with --style-word): print the IoU of the "
            "content and style maps at thresholds 0.1 .. 0.9.",
            rich_help_panel=READOUTS,
        ),
    ] = None,
    style_word: Annotated[
        list[str] | None,
        typer.Option(
            help="Style word of the prompt (repeatable; with --content-word).", rich_help_panel=READOUTS
        ),
    ] = None,
    target: Target = DEFAULT_TARGET,
    timeout: Timeout = None,
) -> None:
    """Generate images, showing a progress bar over the denoising steps; save them as PNG files
    (and print each image's content-vs-style IoU curve when asked)."""
    options = {
        name: value
        for name, value in {
            "negative_prompt": negative_prompt, "width": width, "height": height, "steps": steps,
            "guidance_scale": guidance_scale, "seed": seed, "num_images": num_images,
            "presets": preset or (), "word_heatmaps": word or (),
            "content_words": content_word or (), "style_words": style_word or (),
        }.items()
        if value is not None
    }  # fmt: skip
    if pag_scale is not None or pag_layer or soft_pag_preset:
        options["pag"] = {"layers": pag_layer or []} | ({"scale": pag_scale} if pag_scale is not None else {})
        if soft_pag_preset:
            options["pag"]["soft"] = {"preset": soft_pag_preset}
    complete = None
    with _errors_reported(), _client(context, target, timeout) as client:
        progress = None
        try:
            for response in client.generate_image(
                model, sys.stdin.read() if prompt == "-" else prompt, **options
            ):
                if response.HasField("step"):
                    step = response.step
                    if progress is None:
                        progress = typer.progressbar(
                            length=step.num_steps, label="denoising", file=sys.stderr
                        )
                    progress.update(1)
                else:
                    complete = response.complete
        finally:
            if progress is not None:
                progress.render_finish()
    if complete is None:
        _fail("the server closed the stream without images")
    for path in write_images(complete, out):
        typer.echo(f"wrote {path}", err=True)
    for overlap in complete.content_style_overlaps:
        curve = " ".join(f"{t:.1f}:{iou:.3f}" for t, iou in zip(overlap.thresholds, overlap.iou))
        typer.echo(f"image {overlap.image} content/style IoU {curve}")


@app.command()
def score(
    context: typer.Context,
    prompt: Prompt,
    candidate: Annotated[
        list[str], typer.Option("--candidate", "-c", help="A candidate answer (repeatable).")
    ],
    model: Model = "smollm2",
    chat: Chat = True,
    system: System = None,
    preset: Presets = None,
    sink_calibration: SinkCalibration = None,
    tau: Tau = None,
    beta: Beta = None,
    spec: Annotated[
        pathlib.Path | None,
        typer.Option(help="JSON or YAML spec file (presets, interventions).", rich_help_panel=INTERVENTIONS),
    ] = None,
    image: Images = None,
    target: Target = DEFAULT_TARGET,
    timeout: Timeout = None,
) -> None:
    """Score candidate answers: each one's summed token log-probability after the prompt."""
    inputs = _inputs(prompt, chat, system, image)
    with _errors_reported():
        interventions, readouts = _specs(
            spec, preset, sink_calibration, tau, beta, None, None, False, False, None
        )
        if readouts.ByteSize():
            raise SpecError("score takes no readouts; remove them from the spec file")
        with _client(context, target, timeout) as client:
            response = client.score(model, candidate, **inputs, interventions=interventions)
    typer.echo(formatting.scores_table(response))
    typer.echo(f"{response.usage.prompt_tokens} prompt tokens; "
               f"{response.interventions_applied} intervention(s) applied", err=True)  # fmt: skip


def _inputs(prompt: str, chat: bool, system: str | None, images: list[pathlib.Path] | None) -> dict:
    """The request's input keywords: chat messages or a raw prompt (- reads it from stdin);
    images go before the prompt in the user message."""
    if prompt == "-":
        prompt = sys.stdin.read()
    if not chat:
        if images:
            _fail("--image needs a chat (drop --no-chat)", code=2)
        return {"prompt": prompt}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [*images, prompt] if images else prompt})
    return {"messages": messages}


def _print_stream(
    stream: Iterator[service_pb2.GenerateResponse],
) -> tuple[list[service_pb2.GeneratedToken], service_pb2.GenerateComplete]:
    """Write each token's text to stdout as it arrives; return the tokens and the final response."""
    tokens, complete = [], None
    try:
        for response in stream:
            if response.HasField("token"):
                tokens.append(response.token)
                sys.stdout.write(response.token.text)
                sys.stdout.flush()
            else:
                complete = response.complete
    finally:
        if tokens:
            sys.stdout.write("\n")  # also ends a partial line before an error message
    if complete is None:
        raise AttnserveError(grpc.StatusCode.UNKNOWN, "the stream ended without its final response")
    return tokens, complete


def _specs(
    spec_file: pathlib.Path | None,
    presets: list[str] | None,
    sink_calibration: list[str] | None,
    tau: float | None,
    beta: float | None,
    emphasize: list[str] | None,
    alpha: float | None,
    stats: bool,
    summary: bool,
    attention_rows: list[str] | None,
) -> tuple[intervention_pb2.InterventionSpec, readout_pb2.ReadoutSpec]:
    """The spec file's interventions and readouts, then the flags' (which run after the file's)."""
    interventions, readouts = intervention_pb2.InterventionSpec(), readout_pb2.ReadoutSpec()
    if spec_file is not None:
        file_interventions, file_readouts = specs_from_dict(load_spec_file(spec_file))
        interventions.MergeFrom(file_interventions)
        readouts.MergeFrom(file_readouts)
    flag_interventions, flag_readouts = specs_from_flags(
        presets=presets or (),
        sink_calibration=sink_calibration or (),
        tau=tau,
        beta=beta,
        emphasize=emphasize or (),
        alpha=alpha,
        layer_statistics=stats,
        summary=summary,
        attention_rows=attention_rows or (),
    )
    interventions.MergeFrom(flag_interventions)
    readouts.MergeFrom(flag_readouts)
    return interventions, readouts


@contextlib.contextmanager
def _errors_reported() -> Iterator[None]:
    """Print a bad spec (exit 2) or a failed call with its field violations (exit 1), no traceback."""
    try:
        yield
    except SpecError as err:
        _fail(str(err), code=2)
    except AttnserveError as err:
        _fail(str(err))


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
