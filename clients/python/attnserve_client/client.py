"""Client: the synchronous attnserve client."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

from attnserve_client.completion import Completion, CompletionBuilder
from attnserve_client.errors import AttnserveError
from attnserve_client.request import (
    CHANNEL_OPTIONS,
    GenerateOptions,
    ImageOptions,
    Interventions,
    Message,
    generate_request,
    image_request,
    score_request,
)
from attnserve_client.v1 import image_generation_pb2, model_pb2
from attnserve_client.v1 import inference_service_pb2 as service_pb2
from attnserve_client.v1 import inference_service_pb2_grpc as service_grpc

if TYPE_CHECKING:
    from typing import Self, Unpack  # both need Python 3.11

DEFAULT_TARGET = "localhost:50051"


class Client:
    """Talks to an attnserve server; use as a context manager (or call close()).

    timeout is the deadline in seconds of each call (for generate: the whole stream);
    credentials, when given, make the channel a TLS channel (grpc.ssl_channel_credentials: the
    server's CA, and a client certificate and key for mTLS); token is a bearer token the server
    checks.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        # Sent as call metadata rather than call credentials, which grpc allows on TLS channels
        # only: a token also works where a proxy or mesh terminates TLS in front of the server.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = service_grpc.InferenceServiceStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def list_models(self) -> list[model_pb2.Model]:
        try:
            response = self._stub.ListModels(
                service_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise AttnserveError.from_rpc_error(err) from None
        return list(response.models)

    def get_model(self, name: str) -> model_pb2.Model:
        try:
            response = self._stub.GetModel(
                service_pb2.GetModelRequest(name=name), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise AttnserveError.from_rpc_error(err) from None
        return response.model

    def score(
        self,
        model: str,
        candidates: Sequence[str],
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        *,
        interventions: Interventions | None = None,
        presets: Sequence[str] = (),
        request_id: str = "",
    ) -> service_pb2.ScoreResponse:
        """Each candidate answer's summed token log-probability after the prompt (or chat), with
        the interventions (and presets) applied; scores come in the order of candidates."""
        request = score_request(
            model,
            candidates,
            prompt,
            messages,
            interventions=interventions,
            presets=presets,
            request_id=request_id,
        )
        try:
            return self._stub.Score(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise AttnserveError.from_rpc_error(err) from None

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Iterator[service_pb2.GenerateResponse]:
        """Stream one response per generated token, then the final one.

        Pass exactly one of prompt (raw text) or messages (chat). interventions is an
        InterventionSpec, a spec dict or a list of Intervention; readouts a ReadoutSpec or a dict.
        Leaving the loop early cancels the call.
        """
        return self._stream(generate_request(model, prompt, messages, **options))

    def complete(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Completion:
        """Run generate() to the end and return the whole result; takes generate()'s arguments."""
        builder = CompletionBuilder()
        for response in self.generate(model, prompt, messages, **options):
            builder.add(response)
        return builder.build()

    def generate_image(
        self, model: str, prompt: str, **options: Unpack[ImageOptions]
    ) -> Iterator[image_generation_pb2.GenerateImageResponse]:
        """Stream one response per denoising step (`step`), then the images (`complete`, PNG
        bytes). Leaving the loop early cancels the call."""
        call = self._stub.GenerateImage(
            image_request(model, prompt, **options), timeout=self.timeout, metadata=self._metadata
        )
        try:
            yield from call
        except grpc.RpcError as err:
            raise AttnserveError.from_rpc_error(err) from None
        finally:
            call.cancel()

    def _stream(self, request: service_pb2.GenerateRequest) -> Iterator[service_pb2.GenerateResponse]:
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise AttnserveError.from_rpc_error(err) from None
        finally:
            call.cancel()
