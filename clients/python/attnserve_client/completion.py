"""Completion: the result of a whole Generate stream, folded from its events."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from attnserve_client.errors import AttnserveError
from attnserve_client.v1 import inference_service_pb2 as service_pb2
from attnserve_client.v1 import readout_pb2

_FINISH_PREFIX = "FINISH_REASON_"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Completion:
    """A generated text with its tokens, finish reason, usage and attention readouts.

    finish_reason is "eos", "length" or "stop_string". summary is None unless asked for.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    usage: Usage
    interventions_applied: int
    layer_statistics: list[readout_pb2.LayerStatistics] = field(default_factory=list)
    summary: readout_pb2.AttentionSummary | None = None
    attention_rows: list[readout_pb2.AttentionRow] = field(default_factory=list)


def finish_reason_name(reason: int) -> str:
    """FINISH_REASON_STOP_STRING -> "stop_string"."""
    return service_pb2.FinishReason.Name(reason).removeprefix(_FINISH_PREFIX).lower()


class CompletionBuilder:
    """Collects a stream's events; `add` each response, then `build`."""

    def __init__(self) -> None:
        self._tokens: list[service_pb2.GeneratedToken] = []
        self._complete: service_pb2.GenerateComplete | None = None

    def add(self, response: service_pb2.GenerateResponse) -> None:
        if response.HasField("token"):
            self._tokens.append(response.token)
        elif response.HasField("complete"):
            self._complete = response.complete

    def build(self) -> Completion:
        complete = self._complete
        if complete is None:
            raise AttnserveError(grpc.StatusCode.UNKNOWN, "the stream ended without its final response")
        return Completion(
            text=complete.text,
            token_ids=[t.token_id for t in self._tokens],
            logprobs=[t.logprob for t in self._tokens],
            finish_reason=finish_reason_name(complete.finish_reason),
            usage=Usage(complete.usage.prompt_tokens, complete.usage.completion_tokens),
            interventions_applied=complete.interventions_applied,
            layer_statistics=list(complete.layer_statistics),
            summary=complete.summary if complete.HasField("summary") else None,
            attention_rows=[row for t in self._tokens for row in t.attention_rows],
        )
