"""Soak: many concurrent streams for a long while against a real attnserve server on loopback,
with mixed plans, readouts, cancels and deadlines; bounded in time and in requests.

Reports the status codes (expected: OK, CANCELLED for the streams the client cancels,
DEADLINE_EXCEEDED for those given a short deadline; anything else is unexpected), time to first
token and per-stream throughput percentiles, and the server's resident memory after warm-up and
at the end.

    PYTHONPATH=server .venv/bin/python bench/soak.py --model DIR [--engine transformers|vllm]
        [--streams 64] [--seconds 600] [--max-requests 100000] [--out bench/results/soak-cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import yaml
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2 as ipb
from attnserve_client.v1 import readout_pb2 as rpb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.e2e

from tests.e2e.conftest import ENGINES, running_server

EXPECTED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain what a hash table is to a ten-year-old.",
    "List the planets of the solar system in order from the sun.",
]


def _request(rng: random.Random) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        model="smollm2",
        chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=rng.choice(PROMPTS))]),
        sampling=pb.SamplingParams(max_tokens=rng.choice([8, 16, 32]), temperature=rng.choice([0.0, 0.7])),
    )
    plan = rng.choice(["plain", "plain", "preset", "emphasis"])
    if plan == "preset":
        request.interventions.presets.append("act-l5")
    elif plan == "emphasis":
        request.interventions.interventions.append(
            ipb.Intervention(selector=ipb.Selector(layers=[2, 8]), key_emphasis=ipb.KeyEmphasis(alpha=0.05))
        )
    if rng.random() < 0.2:
        request.readouts.CopyFrom(
            rpb.ReadoutSpec(
                layer_statistics=True, attention_rows=rpb.AttentionRowsSpec(layers=[5], heads=[0])
            )
        )
    return request


async def _stream(stub, rng: random.Random, report: dict) -> None:
    request = _request(rng)
    fate = rng.random()
    timeout = 0.5 if fate < 0.05 else 300  # 5%: a deadline too short to finish
    cancel_after = rng.randint(1, 4) if 0.05 <= fate < 0.15 else None  # 10%: cancelled early
    started = time.monotonic()
    first = None
    tokens = 0
    call = stub.Generate(request, timeout=timeout)
    try:
        async for response in call:
            if response.HasField("token"):
                tokens += 1
                first = first or time.monotonic()
                if cancel_after is not None and tokens >= cancel_after:
                    call.cancel()
                    break
        code = "CANCELLED" if cancel_after is not None and tokens >= cancel_after else "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
        if code not in EXPECTED:
            report["unexpected"].append(f"{code}: {error.details()}"[:300])
    except asyncio.CancelledError:
        code = "CANCELLED"
    report["codes"][code] += 1
    if first is not None:
        report["ttft"].append(first - started)
    if code == "OK" and tokens > 1:
        report["tokens_per_second"].append(tokens / (time.monotonic() - started))
    report["tokens"] += tokens


async def _soak(target: str, args, proc: psutil.Process) -> dict:
    report = {
        "codes": collections.Counter(),
        "ttft": [],
        "tokens_per_second": [],
        "tokens": 0,
        "unexpected": [],
    }
    rng = random.Random(0)
    started = time.monotonic()
    requests = 0
    rss_start = None
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def worker(seed: int) -> None:
            nonlocal requests, rss_start
            local = random.Random(seed)
            while time.monotonic() - started < args.seconds and requests < args.max_requests:
                requests += 1
                await _stream(stub, local, report)
                if rss_start is None and time.monotonic() - started > args.warmup:
                    rss_start = proc.memory_info().rss

        await asyncio.gather(*(worker(rng.randrange(1 << 30)) for _ in range(args.streams)))
    elapsed = time.monotonic() - started

    def percentiles(values: list[float]) -> dict:
        if len(values) < 2:
            return {}
        q = statistics.quantiles(values, n=100)
        return {"p50": round(q[49], 4), "p90": round(q[89], 4), "p99": round(q[98], 4)}

    rss_end = proc.memory_info().rss
    return {
        "streams": args.streams,
        "seconds": round(elapsed, 1),
        "requests": requests,
        "status_codes": dict(report["codes"]),
        "unexpected_errors": len(report["unexpected"]),
        "unexpected_examples": report["unexpected"][:5],
        "time_to_first_token_s": percentiles(report["ttft"]),
        "stream_tokens_per_second": percentiles(report["tokens_per_second"]),
        "total_tokens_per_second": round(report["tokens"] / elapsed, 2),
        "rss_mib_after_warmup": round((rss_start or rss_end) / 2**20, 1),
        "rss_mib_end": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_end / (rss_start or rss_end) - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--engine", choices=list(ENGINES), default="transformers")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=60, help="Memory is compared from this point on.")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak-cpu.json"))
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="attnserve-soak-"))
    model = {
        "name": "smollm2",
        "kind": "llm",
        "engine": args.engine,
        **ENGINES[args.engine],
        "path": str(args.model.resolve()),
        "presets": [{"name": "act-l5", "interventions": [{"layers": [5], "sink_calibration": {}}]}],
    }
    config = folder / "attnserve.yaml"
    # Room for every stream: none is refused for a full queue.
    limits = {"max_batch_size": 16, "max_waiting_requests": args.streams * 2}
    config.write_text(
        yaml.safe_dump({"limits": limits, "models": [model], "cache_dir": str(folder / "cache")})
    )
    with running_server(config, folder / "server.log") as server:
        result = {
            "engine": args.engine,
            **asyncio.run(_soak(server["target"], args, psutil.Process(server["proc"].pid))),
        }
        result["server_log_tracebacks"] = server["log"].read_text().count("Traceback")
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
