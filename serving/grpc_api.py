"""gRPC through Ray Serve's gRPC proxy: `moeray.Moeray/Generate` (server streaming) and `ListModels`.

The proto is `serving/moeray.proto`; its generated modules (`serving/moeray_pb2.py`,
`serving/moeray_pb2_grpc.py`) are committed and part of the installed package, because Serve's proxy
imports the servicer function outside any application runtime_env. Start Serve with

    grpc_options={"port": 9000, "grpc_servicer_functions": [SERVICER_FUNCTION]}

The methods below are mixed into the HTTP ingress class, so both protocols share one deployment, its
autoscaling, its keys and its validation. Clients authenticate with metadata
`authorization: Bearer <key>` (or `x-api-key`) and may name a session with `x-session-id`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from . import moeray_pb2 as pb
from .engine_client import EngineStream
from .errors import APIError
from .frontend import CHAT_PARAMS, COMPLETION_PARAMS, new_id
from .grpc_servicer import Undecodable
from engine.generation import GenerationRequest
from .keys import KeyRing
from .schemas import ChatCompletionRequest, CompletionRequest, parse_request
from .sessions import session_from

SERVICER_FUNCTION = "serving.grpc_servicer.add_moeray_servicer"

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_code(status: int) -> grpc.StatusCode:
    return _CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


class GrpcAbort(Exception):
    """Raised after setting the status on the context: Serve's proxy then answers with that status."""


class MoerayGrpcServicer:
    """Needs `self.watch`, `self.frontend`, `self.keys`, `self.info`, `self.metrics`, `self.max_body_bytes`
    (the ingress has them)."""

    def _grpc_metadata(self, grpc_context) -> dict[str, str]:
        if grpc_context is None:
            return {}
        return {str(k).lower(): v for k, v in grpc_context.invocation_metadata() if isinstance(v, str)}

    def _grpc_fail(self, grpc_context, method: str, error: APIError) -> GrpcAbort:
        self.metrics.request(method, error.status)
        if grpc_context is not None:
            grpc_context.set_code(grpc_code(error.status))
            grpc_context.set_details(error.message)
        return GrpcAbort(f"{error.status}: {error.message}")

    def _check_decoded(self, request) -> None:
        if isinstance(request, Undecodable):
            raise APIError(400, f"The request is not a valid protobuf message: {request.error}")

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context=None) -> pb.ListModelsResponse:
        try:
            self.keys.check(KeyRing.key_from_headers(self._grpc_metadata(grpc_context)))
            self._check_decoded(request)
        except APIError as error:
            raise self._grpc_fail(grpc_context, "grpc_list_models", error) from None
        self.metrics.request("grpc_list_models", 200)
        info = self.info
        return pb.ListModelsResponse(
            models=[pb.Model(id=info.name, owned_by="moeray", created=info.created, max_model_len=info.max_model_len)]
        )

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None) -> AsyncIterator[pb.GenerateResponse]:
        method = "grpc_generate"
        try:
            metadata = self._grpc_metadata(grpc_context)
            owner = self.keys.check(KeyRing.key_from_headers(metadata))
            self._check_decoded(request)
            if request.ByteSize() > self.max_body_bytes:
                raise APIError(413, f"The request is larger than {self.max_body_bytes} bytes.", code="request_too_large")
            request_id, generation, params = self._grpc_generation(request, owner, metadata.get("x-session-id"))
            stream = await EngineStream.open(self.watch, generation, params)
        except APIError as error:
            raise self._grpc_fail(grpc_context, method, error) from None
        try:
            async for batch in stream:
                tokens = [
                    pb.Token(
                        choice=e.choice,
                        token_id=e.token_id,
                        text=e.text,
                        logprob=e.logprob,
                        top_logprobs=[
                            pb.TopLogprob(token_id=t, token=self.frontend.token_string(t), logprob=lp)
                            for t, lp in e.top_logprobs
                        ],
                        finish_reason=e.finish_reason or "",
                    )
                    for e in batch.events
                ]
                yield pb.GenerateResponse(
                    id=request_id,
                    model=self.info.name,
                    tokens=tokens,
                    usage=None if batch.usage is None else pb.Usage(**batch.usage.model_dump()),
                )
        except APIError as error:
            raise self._grpc_fail(grpc_context, method, error) from None
        self.metrics.request(method, 200)

    def _grpc_generation(self, request: pb.GenerateRequest, owner: str,
                         header_session: str | None) -> tuple[str, GenerationRequest, dict[str, str]]:
        given = [bool(request.prompt), len(request.prompt_ids) > 0, len(request.messages) > 0]
        if sum(given) != 1:
            raise APIError(400, "Set exactly one of prompt, prompt_ids and messages.", param="prompt")
        fields: dict = {
            "model": request.model,
            "n": request.n or 1,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
        }
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            if request.HasField(name):
                fields[name] = getattr(request, name)
        if request.stop:
            fields["stop"] = list(request.stop)
        if request.session_id:
            fields["session_id"] = request.session_id
        if request.user:
            fields["user"] = request.user
        logprobs = request.top_logprobs if request.HasField("top_logprobs") else None
        frontend = self.frontend
        if request.messages:
            fields["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            body = parse_request(ChatCompletionRequest, {**fields, "logprobs": logprobs is not None})
            frontend.check_model(body.model)
            prompt = frontend.chat_prompt(body)
            request_id, params = new_id("chatcmpl"), CHAT_PARAMS
        else:
            fields["prompt"] = request.prompt or list(request.prompt_ids)
            body = parse_request(CompletionRequest, fields)
            frontend.check_model(body.model)
            [prompt] = frontend.completion_prompts(body)  # one text or token-id prompt
            request_id, params = new_id("cmpl"), COMPLETION_PARAMS
        session = session_from(body.session_id, header_session)
        generation = frontend.generation_request(body, prompt, body.max_tokens, logprobs, owner, session, request_id)
        return request_id, generation, params
