"""AsyncClient: the asyncio attnserve client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from attnserve_client.client import DEFAULT_TARGET
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


class AsyncClient:
    """The asyncio twin of Client: `async with AsyncClient(...) as client`, then await its
    methods and `async for` over generate()."""

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
            self._channel = aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = service_grpc.InferenceServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def list_models(self) -> list[model_pb2.Model]:
        try:
            response = await self._stub.ListModels(
                service_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise AttnserveError.from_rpc_error(err) from None
        return list(response.models)

    async def get_model(self, name: str) -> model_pb2.Model:
        try:
            response = await self._stub.GetModel(
                service_pb2.GetModelRequest(name=name), timeout=self.timeout, metadata=self._metadata
            )
        except aio.AioRpcError as err:
            raise AttnserveError.from_rpc_error(err) from None
        return response.model

    async def score(
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
            return await self._stub.Score(request, timeout=self.timeout, metadata=self._metadata)
        except aio.AioRpcError as err:
            raise AttnserveError.from_rpc_error(err) from None

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> AsyncIterator[service_pb2.GenerateResponse]:
        """Stream one response per generated token, then the final one (see Client.generate)."""
        return self._stream(generate_request(model, prompt, messages, **options))

    async def complete(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        **options: Unpack[GenerateOptions],
    ) -> Completion:
        """Run generate() to the end and return the whole result; takes generate()'s arguments."""
        builder = CompletionBuilder()
        async for response in self.generate(model, prompt, messages, **options):
            builder.add(response)
        return builder.build()

    async def generate_image(
        self, model: str, prompt: str, **options: Unpack[ImageOptions]
    ) -> AsyncIterator[image_generation_pb2.GenerateImageResponse]:
        """Stream one response per denoising step, then the images (see Client.generate_image)."""
        call = self._stub.GenerateImage(
            image_request(model, prompt, **options), timeout=self.timeout, metadata=self._metadata
        )
        try:
            async for response in call:
                yield response
        except aio.AioRpcError as err:
            raise AttnserveError.from_rpc_error(err) from None
        finally:
            call.cancel()

    async def _stream(
        self, request: service_pb2.GenerateRequest
    ) -> AsyncIterator[service_pb2.GenerateResponse]:
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        except aio.AioRpcError as err:
            raise AttnserveError.from_rpc_error(err) from None
        finally:
            call.cancel()
