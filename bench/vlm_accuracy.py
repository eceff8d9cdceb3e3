"""A method's effect on answer accuracy for a vision-language model: multiple-choice image
questions scored with and without interventions.

    PYTHONPATH=server:clients/python .venv/bin/python bench/vlm_accuracy.py \
        --model DIR --data questions.jsonl [--spec paint.yaml ...] [--preset paint-heads.yaml ...] \
        [--out results.json]
    PYTHONPATH=server:clients/python .venv/bin/python bench/vlm_accuracy.py --synthetic

Each line of the data file is {"image": "path (relative to the file)", "question": "...",
"choices": ["...", ...], "answer": "..."}. Every example is scored through the transformers
engine in-process (the Score computation, no gRPC): the answer is the choice of highest summed
log-probability, once plainly and once under each spec file (the client's spec-file format:
presets are not available here, write the interventions out) and each preset file (what
`attnserve calibrate` or `attnserve calibrate-paint` writes). --synthetic builds a labelled set
of coloured-square images and runs the built-in tiny-llava on it, with PAINT and with PAINT's
head gains calibrated on the same questions (calibration/paint_heads.py): tiny-llava has random
weights, so its accuracy is chance and this only shows that the script works. No real VLM weights
can be had on the machines attnserve is built on; point --model at a local LLaVA directory to
measure a real one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import tempfile
import time

import yaml
from attnserve.api.inputs import to_score_request
from attnserve.attention.paint import paint_head_gains
from attnserve.calibration.paint_heads import ImageQuestion, gain_interventions, measure_sensitivity
from attnserve.engines.hf.engine import TransformersEngine
from attnserve.models.builtin import default_cache_dir, ensure_builtin
from attnserve.models.config import Limits
from attnserve.models.registry import ServedModel
from attnserve_client.request import score_request
from attnserve_client.spec import intervention_spec_from_dict, load_spec_file

#: PAINT with the authors' defaults, on the tiny model's layers 2..3.
TINY_PAINT = {
    "interventions": [
        {
            "layers": [2, 3],
            "queries": "last",
            "keys": {"image_tokens": {"tokens": part}},
            "logit_rescale": {"alpha": a},
        }
        for part, a in (("paint_local", 0.7), ("paint_summary", 0.3))
    ]
}
COLOURS = ("red", "green", "blue", "yellow")


def synthetic_set(folder: pathlib.Path) -> pathlib.Path:
    """A coloured square on a grey background per example; the question asks its colour."""
    from PIL import Image

    lines = []
    for i, colour in enumerate(COLOURS * 3):
        image = Image.new("RGB", (48, 48), "grey")
        offset = 4 + 6 * (i % 4)
        image.paste(colour, (offset, offset, offset + 20, offset + 20))
        name = f"square-{i}.png"
        image.save(folder / name)
        lines.append(
            {
                "image": name,
                "question": "which colour is the square?",
                "choices": list(COLOURS),
                "answer": colour,
            }
        )
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return data


async def accuracy(served: ServedModel, examples: list[dict], folder: pathlib.Path, spec) -> dict:
    correct, answers, started = 0, [], time.monotonic()
    for example in examples:
        messages = [("user", [folder / example["image"], example["question"]])]
        request = score_request(served.name, example["choices"], messages=messages, interventions=spec)
        scores = await served.engine.score(to_score_request(request, served))
        chosen = example["choices"][max(range(len(scores)), key=scores.__getitem__)]
        answers.append(chosen)
        correct += chosen == example["answer"]
    return {
        "accuracy": correct / len(examples),
        "answers": answers,
        "seconds_per_example": (time.monotonic() - started) / len(examples),
    }


async def paint_head_gains_spec(served: ServedModel, examples: list[dict], folder: pathlib.Path):
    """PAINT with head gains calibrated on the examples' images and questions (layers 2..3)."""
    questions = [ImageQuestion(folder / e["image"], e["question"]) for e in examples]
    sensitivity = await measure_sensitivity(served, questions, [2, 3])
    gains = paint_head_gains(sensitivity, step=0.5, max_gain=2.0)
    return intervention_spec_from_dict({"interventions": gain_interventions(gains, [2, 3], 0.7, 0.3)})


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=pathlib.Path, help="a local LLaVA-family model directory")
    parser.add_argument("--data", type=pathlib.Path, help="a JSONL file of labelled image questions")
    parser.add_argument("--spec", type=pathlib.Path, action="append", default=[], help="a method's spec file")
    parser.add_argument(
        "--preset", type=pathlib.Path, action="append", default=[], help="a preset file (calibrate's output)"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="tiny-llava on a generated colour set, with PAINT"
    )
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    methods = {path.stem: intervention_spec_from_dict(load_spec_file(path)) for path in args.spec}
    for path in args.preset:
        interventions = yaml.safe_load(path.read_text())["interventions"]
        methods[path.stem] = intervention_spec_from_dict({"interventions": interventions})
    with tempfile.TemporaryDirectory() as scratch:
        if args.synthetic:
            model = ensure_builtin("tiny-llava", default_cache_dir())
            data = synthetic_set(pathlib.Path(scratch))
            methods["paint"] = intervention_spec_from_dict(TINY_PAINT)
        elif args.model and args.data:
            model, data = args.model, args.data
        else:
            parser.error("give --model and --data, or --synthetic")
        examples = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        engine = TransformersEngine(model)
        await engine.start()
        served = ServedModel("model", "vlm", "transformers", engine, Limits(), {})
        try:
            if args.synthetic:
                methods["paint-heads"] = await paint_head_gains_spec(served, examples, data.parent)
            results = {"plain": await accuracy(served, examples, data.parent, None)}
            for name, spec in methods.items():
                results[name] = await accuracy(served, examples, data.parent, spec)
                changed = sum(a != b for a, b in zip(results[name]["answers"], results["plain"]["answers"]))
                results[name]["answers_changed"] = changed
        finally:
            await engine.shutdown()
    report = {
        "model": str(model),
        "data": str(data) if not args.synthetic else "synthetic colour squares",
        "examples": len(examples),
        "results": results,
    }
    for name, result in results.items():
        print(
            f"{name:>10}: accuracy {result['accuracy']:.3f}  ({result['seconds_per_example'] * 1000:.0f} ms/example)"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
