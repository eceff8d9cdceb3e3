"""InferenceService: translates protos to engine requests and engine outputs to protos."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from attnserve_client.v1 import image_generation_pb2 as image_pb
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from attnserve_client.v1 import intervention_pb2

from ..engines.base import (
    CandidateScoring,
    DenoisingProgress,
    EngineDead,
    GeneratedImages,
    ImageGeneration,
    NonFiniteOutput,
    TextGeneration,
    TokenOutput,
    served_rpcs,
)
from ..metrics import ServerMetrics
from ..models.registry import ModelRegistry, ServedModel
from ..readouts import READOUTS, ResponseContext, word_heatmaps
from ..spec.errors import FieldViolation, InvalidRequest, Overloaded, RequestError, Unsupported
from . import errors
from .image_inputs import to_image_request
from .inputs import to_engine_request, to_score_request
from .visual_recipes import to_visual_recipe

log = logging.getLogger("attnserve.api")

FINISH_REASONS = {
    "eos": pb.FINISH_REASON_EOS,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_string": pb.FINISH_REASON_STOP_STRING,
}


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics):
        self._registry = registry
        self._metrics = metrics
        #: Set when a call finds its engine dead (dead_engine says which): the server stops.
        self.engine_died = asyncio.Event()
        self.dead_engine: tuple[str, str] | None = None
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start_draining(self) -> None:
        """Refuse new calls with UNAVAILABLE from now on; calls in flight go on."""
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False if timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def _call(self, context):
        """Admits a new call (UNAVAILABLE while draining) and counts it while in flight."""
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def ListModels(self, request, context):
        async with self._call(context):
            return pb.ListModelsResponse(models=[m.describe() for m in self._registry])

    async def GetModel(self, request, context):
        async with self._call(context):
            return await self._get_model(request, context)

    async def Generate(self, request, context):
        async with self._call(context):
            async for response in self._generate(request, context):
                yield response

    async def Score(self, request, context):
        async with self._call(context):
            return await self._score(request, context)

    async def GenerateImage(self, request, context):
        async with self._call(context):
            async for response in self._generate_image(request, context):
                yield response

    async def _get_model(self, request, context):
        try:
            if not request.name:
                raise InvalidRequest([FieldViolation("name", "must name a model")])
            return pb.GetModelResponse(model=self._registry.get(request.name).describe())
        except RequestError as exc:
            await self._refuse(context, exc, None)

    async def _generate(self, request, context):
        started = time.monotonic()
        model = None
        try:
            model = self._model(request.model)
            engine = capable_engine(model, TextGeneration, "Generate")
            recipe = to_visual_recipe(request, model) if request.WhichOneof("visual_recipe") else None
            # With a recipe, the final pass stands for the request (its images the crops once run).
            engine_request = recipe.final_request if recipe else to_engine_request(request, model)
            _admit(model)
        except RequestError as exc:
            await self._refuse(context, exc, model)
            return
        labels = (model.name, model.engine_name)
        for operation in engine_request.plan.applied_operations:
            self._metrics.interventions_applied(*labels, operation)
        log.info(
            "generate request_id=%s model=%s prompt_tokens=%d max_tokens=%d interventions=%d recipe=%s",
            engine_request.request_id,
            model.name,
            len(engine_request.prompt_token_ids),
            engine_request.sampling.max_tokens,
            len(engine_request.plan.applied_operations),
            request.WhichOneof("visual_recipe"),
        )

        self._metrics.request_queued(*labels)
        text: list[str] = []
        generated = 0
        last_time = None
        finish = "cancelled"
        try:
            stream = recipe.generate(engine) if recipe else engine.generate(engine_request)
            async for out in stream:
                now = time.monotonic()
                if last_time is None:
                    self._metrics.request_started(*labels, out.queue_seconds or 0.0)
                    self._metrics.first_token(*labels, now - started)
                else:
                    self._metrics.inter_token(*labels, now - last_time)
                last_time, generated = now, generated + 1
                text.append(out.text)
                yield pb.GenerateResponse(token=self._token_proto(out, model))
                if out.finish_reason is not None:
                    finish = out.finish_reason
                    complete = self._complete_proto(out, "".join(text), engine_request, model)
                    if recipe:
                        complete.visual_recipe.CopyFrom(recipe.outcome.to_proto())
                    yield pb.GenerateResponse(complete=complete)
        except asyncio.CancelledError:
            finish = "deadline" if _deadline_passed(context) else "cancelled"
            raise
        except EngineDead as exc:
            finish = "error"
            log.error("generate failed request_id=%s: %s", engine_request.request_id, exc)
            self._engine_dead(model, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; the server is restarting, retry")
        except NonFiniteOutput as exc:
            finish = "error"
            log.warning("generate failed request_id=%s: %s", engine_request.request_id, exc)
            await context.abort_with_status(errors.non_finite_output(exc, engine_request.request_id))
        except Exception:
            finish = "error"
            log.exception("generate failed request_id=%s", engine_request.request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, "the engine failed while generating; see server logs"
            )
        finally:
            if recipe and recipe.outcome.passes:
                outcome = recipe.outcome
                self._metrics.recipe_passes(
                    *labels,
                    request.WhichOneof("visual_recipe"),
                    outcome.passes,
                    outcome.reading_prompt_tokens,
                    outcome.reading_tokens,
                )
            if last_time is None:
                self._metrics.request_left_queue(*labels, finish)
            else:
                self._metrics.request_finished(
                    *labels,
                    finish,
                    len(engine_request.prompt_token_ids),
                    generated,
                    time.monotonic() - started,
                )

    async def _score(self, request, context):
        model = None
        try:
            model = self._model(request.model)
            # The fields are checked with the model's tokenizer before whether its engine scores,
            # so a bad field is INVALID_ARGUMENT on every text engine; a model without a text
            # engine (diffusion) has no tokenizer and is refused first.
            capable_engine(model, TextGeneration, "Score")
            score_request = to_score_request(request, model)
            engine = capable_engine(model, CandidateScoring, "Score")
            _admit(model)
            log.info(
                "score request_id=%s model=%s prompt_tokens=%d candidates=%d interventions=%d",
                score_request.request_id,
                model.name,
                len(score_request.prompt_token_ids),
                len(score_request.candidate_token_ids),
                len(score_request.plan.applied_operations),
            )
            scores = await engine.score(score_request)
        except RequestError as exc:
            await self._refuse(context, exc, model)
            return
        except EngineDead as exc:
            log.error("score failed request_id=%s: %s", score_request.request_id, exc)
            self._engine_dead(model, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; the server is restarting, retry")
        except NonFiniteOutput as exc:
            log.warning("score failed request_id=%s: %s", score_request.request_id, exc)
            await context.abort_with_status(errors.non_finite_output(exc, score_request.request_id))
        except Exception:
            log.exception("score failed model=%s", model.name)
            await context.abort(grpc.StatusCode.INTERNAL, "the engine failed while scoring; see server logs")
        return pb.ScoreResponse(
            scores=[
                pb.CandidateScore(candidate=text, logprob=logprob, num_tokens=len(ids))
                for text, logprob, ids in zip(request.candidates, scores, score_request.candidate_token_ids)
            ],
            usage=pb.Usage(prompt_tokens=len(score_request.prompt_token_ids)),
            interventions_applied=len(score_request.plan.applied_operations),
        )

    async def _generate_image(self, request, context):
        model = None
        try:
            model = self._model(request.model)
            engine = capable_engine(model, ImageGeneration, "GenerateImage")
            image_request = to_image_request(request, model, engine)
            _admit(model)
        except RequestError as exc:
            await self._refuse(context, exc, model)
            return
        for operation in image_request.plan.applied_operations:
            self._metrics.interventions_applied(model.name, model.engine_name, operation)
        log.info(
            "generate_image request_id=%s model=%s size=%dx%d steps=%d images=%d pag=%s interventions=%d",
            image_request.request_id,
            model.name,
            image_request.width,
            image_request.height,
            image_request.steps,
            image_request.num_images,
            image_request.perturbed is not None,
            len(image_request.plan.applied_operations),
        )
        try:
            async for event in engine.generate_image(image_request):
                if isinstance(event, DenoisingProgress):
                    yield image_pb.GenerateImageResponse(
                        step=image_pb.DenoisingStep(
                            step=event.step,
                            timestep=event.timestep,
                            elapsed_seconds=event.elapsed,
                            num_steps=image_request.steps,
                        )
                    )
                elif isinstance(event, GeneratedImages):
                    images = [
                        image_pb.GeneratedImage(
                            png=png, width=image_request.width, height=image_request.height
                        )
                        for png in event.png
                    ]
                    complete = image_pb.GenerateImageComplete(
                        images=images, interventions_applied=len(image_request.plan.applied_operations)
                    )
                    word_heatmaps.write(complete, image_request.heatmap_words, event.heatmaps)
                    yield image_pb.GenerateImageResponse(complete=complete)
        except EngineDead as exc:
            log.error("generate_image failed request_id=%s: %s", image_request.request_id, exc)
            self._engine_dead(model, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; the server is restarting, retry")
        except Exception:
            log.exception("generate_image failed request_id=%s", image_request.request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, "the engine failed while generating images; see server logs"
            )

    def _model(self, name: str) -> ServedModel:
        if not name:
            raise InvalidRequest([FieldViolation("model", "must name a model; ListModels lists them")])
        return self._registry.get(name)

    def _engine_dead(self, model: ServedModel, exc: EngineDead) -> None:
        self.dead_engine = self.dead_engine or (model.name, str(exc))
        self.engine_died.set()

    async def _refuse(self, context, exc: RequestError, model: ServedModel | None) -> None:
        """Abort with exc's status; model is None when the request named no served model."""
        status = errors.to_status(exc)
        self._metrics.request_rejected(
            model.name if model else "", model.engine_name if model else "", status.code
        )
        await context.abort_with_status(status)

    @staticmethod
    def _token_proto(out: TokenOutput, model: ServedModel) -> pb.GeneratedToken:
        tokenizer = model.engine.tokenizer
        token = pb.GeneratedToken(
            index=out.index,
            token_id=out.token_id,
            text=out.text,
            logprob=out.logprob,
            top_logprobs=[
                pb.TopLogprob(token_id=t, text=tokenizer.decode([t]), logprob=lp)
                for t, lp in out.top_logprobs
            ],
        )
        for name, state in out.step_readouts.items():
            READOUTS[name].write_token(token, state)
        return token

    @staticmethod
    def _complete_proto(
        out: TokenOutput, text: str, engine_request, model: ServedModel
    ) -> pb.GenerateComplete:
        complete = pb.GenerateComplete(
            finish_reason=FINISH_REASONS[out.finish_reason],
            usage=pb.Usage(
                prompt_tokens=len(engine_request.prompt_token_ids), completion_tokens=out.index + 1
            ),
            text=text,
            interventions_applied=len(engine_request.plan.applied_operations),
            image_tokens=[intervention_pb2.TokenRange(start=s, end=e) for s, e in engine_request.image_spans],
        )
        results = out.readouts or {}
        response = ResponseContext(engine_request.prompt_token_ids, model.engine.tokenizer)
        for settings in engine_request.plan.readouts:
            READOUTS[settings.name].write_complete(complete, settings, results.get(settings.name), response)
        return complete


def capable_engine(model: ServedModel, capability: type, rpc: str):
    """The model's engine, if it has the capability the RPC needs."""
    if not isinstance(model.engine, capability):
        served = ", ".join(served_rpcs(model.engine)) or "none"
        raise Unsupported(
            f"model {model.name!r} ({model.engine_name} engine) cannot serve {rpc}; "
            f"it serves: {served} (GetModel lists them)"
        )
    return model.engine


def _admit(model: ServedModel) -> None:
    """Admission control: refuse while max_waiting_requests are waiting."""
    if model.engine.num_waiting >= model.limits.max_waiting_requests:
        raise Overloaded(f"{model.engine.num_waiting} requests are waiting for {model.name}; retry later")


def _deadline_passed(context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0
