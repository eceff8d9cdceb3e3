"""Raw vLLM (attnserve's plugin off) asked for each attention backend: which one it runs and how
long a short greedy generate takes. One child process per backend; the backends vLLM actually
runs are read from its model runner's attention groups, its refusals from its log.

    PYTHONPATH=server .venv/bin/python bench/vllm_attention_backends.py \
        [--model .cache/test-models/models/smollm2-135m-instruct] [--backends default FLEX_ATTENTION] \
        [--prompts 16] [--tokens 32] [--repeats 3] [--out bench/results/vllm-attention-backends-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, statistics, sys, time
from vllm import LLM, SamplingParams
backend, model, prompts, tokens, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
kwargs = {} if backend == "default" else {"attention_backend": backend}
llm = LLM(model=model, dtype="float32", enforce_eager=True, max_num_seqs=16, seed=0, **kwargs)
def backends(worker):
    groups = worker.model_runner.attn_groups
    return sorted({group.backend.get_name() for per_cache in groups for group in per_cache})
used = llm.collective_rpc(backends)[0]
params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
batch = [f"Write a short note about the number {i}." for i in range(prompts)]
llm.generate(batch, params, use_tqdm=False)  # warm-up
times = []
for _ in range(repeats):
    started = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    times.append(time.perf_counter() - started)
print("RESULT " + json.dumps({"backends_used": used, "seconds": statistics.median(times), "runs": times,
      "first_output": outputs[0].outputs[0].text}))
"""


def run_backend(backend: str, args: argparse.Namespace) -> dict:
    # Insecure serialization: the backend check is a function sent to the worker (collective_rpc).
    env = os.environ | {
        "VLLM_PLUGINS": "",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    command = [sys.executable, "-c", CHILD, backend, str(args.model)]
    command += [str(args.prompts), str(args.tokens), str(args.repeats)]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    refused = re.findall(r"Cannot use (\S+) backend on CPU", log)
    result = {"asked": backend, "refused": sorted(set(refused))}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return result | {"error": log[-2000:]}
    measured = json.loads(lines[-1].removeprefix("RESULT "))
    tokens = args.prompts * args.tokens
    return result | measured | {"tokens_per_second": tokens / measured["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path(".cache/test-models/models/smollm2-135m-instruct"))
    parser.add_argument("--backends", nargs="+", default=["default", "FLEX_ATTENTION"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    for backend in args.backends:
        results.append(run_backend(backend, args))
        print(json.dumps({key: value for key, value in results[-1].items() if key != "error"}))
        if "error" in results[-1]:
            print(results[-1]["error"], file=sys.stderr)
    if args.out:
        settings = vars(args) | {"model": str(args.model), "out": str(args.out)}
        args.out.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
