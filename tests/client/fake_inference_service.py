"""A fake InferenceService: the clients and the CLI run over real gRPC without the model server."""

from __future__ import annotations

import grpc
from attnserve_client.v1 import inference_service_pb2 as service_pb2
from attnserve_client.v1 import inference_service_pb2_grpc as service_grpc
from attnserve_client.v1 import intervention_pb2, model_pb2, readout_pb2
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

NUM_LAYERS = 30
PROMPT_TOKENS = 6
ANSWER = ("The", " capital", " is", " Paris", ".")

FAKE_MODEL = model_pb2.Model(
    name="smollm2",
    kind=model_pb2.MODEL_KIND_LLM,
    engine=model_pb2.ENGINE_KIND_TRANSFORMERS,
    num_layers=NUM_LAYERS,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_context_length=8192,
    layers=[
        model_pb2.AttentionLayer(
            name=f"model.layers.{i}.self_attn",
            index=i,
            kind=intervention_pb2.ATTENTION_KIND_SELF,
            causal=True,
            component=model_pb2.MODEL_COMPONENT_LANGUAGE_MODEL,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
        )
        for i in range(NUM_LAYERS)
    ],
    supported_operations=[intervention_pb2.OPERATION_KIND_SINK_CALIBRATION],
    supported_readouts=[model_pb2.READOUT_KIND_LAYER_STATISTICS],
    presets=[model_pb2.Preset(name="act", description="ACT on every layer", provenance={"source": "test"})],
    limits=model_pb2.ModelLimits(max_prompt_tokens=4096, max_tokens=512, max_interventions=16),
    supported_rpcs=["Generate", "Score"],
    input_modalities=["text"],
    parameter_ranges=[
        model_pb2.ParameterRange(field="sampling.temperature", min=0.01, max=100, zero_allowed=True),
        model_pb2.ParameterRange(
            field="sink_calibration.tau", min=0, max=1, min_exclusive=True, max_exclusive=True
        ),
    ],
)


def bad_request_status(field: str, description: str) -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            ]
        )
    )
    return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="invalid request", details=[detail])


class FakeInferenceService(service_grpc.InferenceServiceServicer):
    """Answers every prompt with ANSWER; rejects layers beyond NUM_LAYERS like the real server."""

    def __init__(self) -> None:
        self.requests: list[service_pb2.GenerateRequest] = []

    def ListModels(self, request, context):
        return service_pb2.ListModelsResponse(models=[FAKE_MODEL])

    def GetModel(self, request, context):
        if request.name != FAKE_MODEL.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} is not served")
        return service_pb2.GetModelResponse(model=FAKE_MODEL)

    def Generate(self, request, context):
        self.requests.append(request)
        for i, intervention in enumerate(request.interventions.interventions):
            for j, layer in enumerate(intervention.selector.layers):
                if layer >= NUM_LAYERS:
                    field = f"interventions.interventions[{i}].selector.layers[{j}]"
                    status = bad_request_status(field, f"layer {layer} is out of range")
                    context.abort_with_status(rpc_status.to_status(status))
        rows_spec = request.readouts.attention_rows
        for step, text in enumerate(ANSWER):
            token = service_pb2.GeneratedToken(index=step, token_id=100 + step, text=text, logprob=-0.5)
            if step in (rows_spec.steps or [0]):
                token.attention_rows.extend(_rows(rows_spec, step))
            yield service_pb2.GenerateResponse(token=token)
        complete = service_pb2.GenerateComplete(
            finish_reason=service_pb2.FINISH_REASON_EOS,
            usage=service_pb2.Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=len(ANSWER)),
            text="".join(ANSWER),
            interventions_applied=len(request.interventions.interventions),
        )
        if request.readouts.layer_statistics:
            complete.layer_statistics.extend(
                readout_pb2.LayerStatistics(
                    layer=layer, entropy=1.5, sink_mass=0.25 + layer / 100, query_count=11
                )
                for layer in range(NUM_LAYERS)
            )
        if request.readouts.summary:
            complete.summary.text = "The answer attended mostly to 'France'."
        yield service_pb2.GenerateResponse(complete=complete)

    def Score(self, request, context):
        """Scores a candidate -(its length) / 10, so shorter answers rank first."""
        self.requests.append(request)
        return service_pb2.ScoreResponse(
            scores=[
                service_pb2.CandidateScore(candidate=c, logprob=-len(c) / 10, num_tokens=len(c.split()))
                for c in request.candidates
            ],
            usage=service_pb2.Usage(prompt_tokens=PROMPT_TOKENS),
            interventions_applied=len(request.interventions.interventions),
        )


def _rows(spec: readout_pb2.AttentionRowsSpec, step: int) -> list[readout_pb2.AttentionRow]:
    position = PROMPT_TOKENS - 1 + step
    weights = [float(k + 1) for k in range(position + 1)]
    total = sum(weights)
    return [
        readout_pb2.AttentionRow(
            layer=layer, head=head, step=step, query_position=position, weights=[w / total for w in weights]
        )
        for layer in spec.layers
        for head in spec.heads
    ]
