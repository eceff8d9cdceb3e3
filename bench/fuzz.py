"""The long fuzz run: thousands of hypothesis-drawn requests (tests/e2e/fuzzing.py) against a real
attnserve server on loopback, from a default grpcio client, bounded in count and time.

Starts `attnserve serve` on the given model and engine, keeps a greedy stream running beside the
fuzzed calls for the whole run (every run's tokens must equal the solo run's), checks every
answer against the rule in fuzzing.py, then checks the server is SERVING and answers the known
prompt as before. Prints the status codes seen and writes them to --out.

    PYTHONPATH=server .venv/bin/python bench/fuzz.py --model DIR [--engine transformers|vllm]
        [--requests 10000] [--seconds 3600] [--out bench/results/fuzz-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.e2e

from tests.e2e.conftest import ENGINES, SERVICE, running_server
from tests.e2e.fuzzing import StreamsBeside, Tally, calls, greedy_tokens, send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--engine", choices=list(ENGINES), default="transformers")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3600, help="Stop sending after this long.")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuzz-cpu.json"))
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="attnserve-fuzz-"))
    model = {
        "name": "smollm2",
        "kind": "llm",
        "engine": args.engine,
        **ENGINES[args.engine],
        "path": str(args.model.resolve()),
    }
    model["presets"] = [{"name": "act-l5", "interventions": [{"layers": [5], "sink_calibration": {}}]}]
    config = folder / "attnserve.yaml"
    config.write_text(yaml.safe_dump({"models": [model], "cache_dir": str(folder / "cache")}))

    tally = Tally()
    started = time.monotonic()
    with (
        running_server(config, folder / "server.log") as server,
        grpc.insecure_channel(server["target"]) as channel,
    ):
        alone = greedy_tokens(channel)

        @settings(
            max_examples=args.requests, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(calls())
        def fuzz(call) -> None:
            if time.monotonic() - started < args.seconds:
                tally.add(send(channel, call))
                if tally.total % 500 == 0:
                    print(
                        f"{tally.total} requests, {time.monotonic() - started:.0f} s: {dict(tally.codes)}",
                        flush=True,
                    )

        with StreamsBeside(channel, alone) as beside:
            fuzz()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        result = {
            "engine": args.engine,
            "requests": tally.total,
            "seconds": round(time.monotonic() - started, 1),
            "status_codes": dict(tally.codes),
            "streams_beside": beside.runs,
            "streams_beside_harmed": beside.mismatches,
            "serving_after": health.status == health_pb2.HealthCheckResponse.SERVING,
            "known_prompt_unchanged_after": greedy_tokens(channel) == alone,
            "server_log_tracebacks": server["log"].read_text().count("Traceback"),
        }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
