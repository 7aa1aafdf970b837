"""The OpenAI-compatible HTTP ingress (FastAPI on Ray Serve), which also answers the gRPC proxy.

Routes: GET /health (no key), GET /openapi.json (no key: the request models as they are validated),
GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST /v1/chat/completions (both with SSE
streaming), GET /v1/sessions and DELETE /v1/sessions/{session_id} (the caller's own sessions), GET
/v1/stats (engine statistics). The ingress authenticates, validates, tokenizes and formats; the single
engine replica (`serving.app.EngineServer`) schedules. Every error is OpenAI-shaped JSON; a 429 or 503
says when to retry (Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine_client import EngineStream, EngineWatch, merged, total_usage
from .errors import APIError
from .frontend import CHAT_PARAMS, COMPLETION_PARAMS, Frontend, new_id
from engine.generation import TokenEvent, Usage
from .grpc_api import MoerayGrpcServicer
from .keys import KeyRing
from .model_info import load_serving_tokenizer
from .openapi import documented, install_openapi
from .schemas import ChatCompletionRequest, CompletionRequest, parse_request
from .sessions import check_session_id, session_from

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BODY_BYTES = 1024 * 1024

app = FastAPI(title="moeray", docs_url=None, redoc_url=None)
install_openapi(app)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error_response(error)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return error_response(APIError(400, str(error)))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return error_response(APIError(error.status_code, str(error.detail), kind))


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error in %s %s", request.method, request.url.path)
    return error_response(APIError(500, "The server had an error processing the request.", "server_error"))


def usage_body(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class OpenAIServerImpl(MoerayGrpcServicer):
    """One ingress replica (autoscaled): the `OpenAIServer` deployment of `serving.app.build`."""

    async def __init__(self, engine, settings: dict):
        from .metrics import IngressMetrics

        self.engine = engine
        self.info = await engine.info.remote()
        tokenizer = load_serving_tokenizer(settings["model_dir"], settings.get("tokenizer", "auto"), self.info.vocab_size)
        self.frontend = Frontend(self.info, tokenizer)
        self.keys = KeyRing(digests=settings.get("api_key_digests") or [])
        self.max_body_bytes = settings.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES)
        self.metrics = IngressMetrics(self.info.name)
        self.watch = EngineWatch(engine)
        if not self.keys.enabled:
            logger.warning("moeray: no API keys configured; every request is accepted")

    async def check_health(self) -> None:
        """Cheap on purpose: a busy ingress is healthy."""

    # ---- helpers -----------------------------------------------------------------------------------
    def _owner(self, request: Request) -> str:
        return self.keys.check(KeyRing.key_from_headers(request.headers))

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than {self.max_body_bytes} bytes.",
                        param=None, code="request_too_large")

    async def _respond(self, endpoint: str, handler, request: Request) -> Response:
        try:
            response = await handler(request)
        except APIError as error:
            self.metrics.request(endpoint, error.status)
            if error.status >= 500:
                logger.warning("%s: %s", endpoint, error.message)
            return error_response(error)
        self.metrics.request(endpoint, response.status_code)
        return response

    # ---- routes ------------------------------------------------------------------------------------
    @app.get("/health", **documented(authenticated=False))
    async def health(self) -> Response:
        """For load balancers and readiness probes (no key): 503 while the engine does not answer."""
        try:
            await asyncio.wait_for(self.engine.check_health.remote(), timeout=10)
        except Exception:
            return JSONResponse({"status": "unavailable", "model": self.info.name}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.info.name})

    @app.get("/v1/models", **documented())
    async def list_models(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            self._owner(request)
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        return await self._respond("models", handle, request)

    @app.get("/v1/models/{model:path}", **documented())
    async def get_model(self, model: str, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            self._owner(request)
            self.frontend.check_model(model)
            return JSONResponse(self._model_card())

        return await self._respond("models", handle, request)

    @app.get("/v1/stats", **documented())
    async def stats(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            self._owner(request)
            return JSONResponse(await self.watch.call("stats"))

        return await self._respond("stats", handle, request)

    @app.post("/v1/completions", **documented(CompletionRequest, session_header=True))
    async def completions(self, request: Request) -> Response:
        return await self._respond("completions", self._completions, request)

    @app.post("/v1/chat/completions", **documented(ChatCompletionRequest, session_header=True))
    async def chat_completions(self, request: Request) -> Response:
        return await self._respond("chat_completions", self._chat_completions, request)

    @app.get("/v1/sessions", **documented())
    async def list_sessions(self, request: Request) -> Response:
        """The caller's sessions (another key's are never listed)."""

        async def handle(request: Request) -> Response:
            sessions = await self.watch.call("sessions", self._owner(request))
            return JSONResponse({"object": "list", "data": [{"object": "session", **s} for s in sessions]})

        return await self._respond("sessions", handle, request)

    @app.delete("/v1/sessions/{session_id}", **documented())
    async def end_session(self, session_id: str, request: Request) -> Response:
        """End one of the caller's sessions now: its latent cache and offloaded data go."""

        async def handle(request: Request) -> Response:
            owner = self._owner(request)
            check_session_id(session_id, "session_id")
            await self.watch.call("end_session", owner, session_id)
            return JSONResponse({"id": session_id, "object": "session", "deleted": True})

        return await self._respond("sessions", handle, request)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"],
                   include_in_schema=False)
    async def unknown(self, path: str, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            self._owner(request)
            raise APIError(404, f"Unknown endpoint {request.method} /{path}.", code="unknown_url")

        return await self._respond("unknown", handle, request)

    def _model_card(self) -> dict:
        return {"id": self.info.name, "object": "model", "created": self.info.created, "owned_by": "moeray",
                "max_model_len": self.info.max_model_len}

    # ---- completions -------------------------------------------------------------------------------
    async def _completions(self, request: Request) -> Response:
        owner = self._owner(request)
        body = parse_request(CompletionRequest, await self._body(request))
        self.frontend.check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported.", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of must equal n (no server-side ranking).", param="best_of")
        session = session_from(body.session_id, request.headers.get("x-session-id"))
        prompts = self.frontend.completion_prompts(body)
        if session and len(prompts) > 1:
            raise APIError(400, "A session continues one conversation: send one prompt with a session.",
                           param="prompt")
        request_id = new_id("cmpl")
        generations = [
            self.frontend.generation_request(body, prompt, body.max_tokens, body.logprobs, owner, session,
                                             f"{request_id}-{i}")
            for i, prompt in enumerate(prompts)
        ]
        streams = await EngineStream.open_all(self.watch, generations, COMPLETION_PARAMS)
        created = int(time.time())
        headers = {"X-Session-Id": session} if session else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._completion_chunks(streams, request_id, created, body, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        choices, usage = await _collect(streams, body.n)
        result = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": self.info.name,
            "choices": [
                {
                    "index": i,
                    "text": "".join(c["text"]),
                    "logprobs": self._completion_logprobs(c["events"], 0) if body.logprobs is not None else None,
                    "finish_reason": c["finish_reason"],
                }
                for i, c in choices.items()
            ],
            "usage": usage_body(usage),
        }
        if session:
            result["session_id"] = session
        return JSONResponse(result, headers=headers)

    def _completion_logprobs(self, events: list[TokenEvent], offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for event in events:
            token = self.frontend.token_string(event.token_id)
            tokens.append(token)
            token_logprobs.append(event.logprob)
            top.append({self.frontend.token_string(t): lp for t, lp in event.top_logprobs})
            offsets.append(offset)
            offset += len(event.text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    async def _completion_chunks(self, streams: list[EngineStream], request_id: str, created: int,
                                 body: CompletionRequest, include_usage: bool) -> AsyncIterator[str]:
        """Each prompt's choices numbered as OpenAI does, prompt by prompt (index = prompt * n + choice);
        the usage, summed over the prompts, once all have finished."""
        offsets = [0] * (body.n * len(streams))
        usages: list[Usage] = []
        base = {"id": request_id, "object": "text_completion", "created": created, "model": self.info.name}
        try:
            async for prompt, batch in merged(streams):
                out = []
                for choice, events in _by_choice(batch.events).items():
                    index = prompt * body.n + choice
                    text = "".join(e.text for e in events)
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = self._completion_logprobs(events, offsets[index])
                    offsets[index] += len(text)
                    entry = {"index": index, "text": text, "logprobs": logprobs,
                             "finish_reason": events[-1].finish_reason}
                    out.append(sse({**base, "choices": [entry], **({"usage": None} if include_usage else {})}))
                if batch.usage is not None:
                    usages.append(batch.usage)
                if len(usages) == len(streams) and include_usage:
                    out.append(sse({**base, "choices": [], "usage": usage_body(total_usage(usages))}))
                if out:
                    yield "".join(out)
        except APIError as error:
            yield sse(error.body())
        yield sse("[DONE]")

    # ---- chat completions --------------------------------------------------------------------------
    async def _chat_completions(self, request: Request) -> Response:
        owner = self._owner(request)
        body = parse_request(ChatCompletionRequest, await self._body(request))
        self.frontend.check_model(body.model)
        if body.tools or body.functions:
            raise APIError(400, "Tools and function calling are not supported.", param="tools")
        if body.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice is not supported.", param="tool_choice")
        if body.response_format and body.response_format.get("type") != "text":
            raise APIError(400, "Only the 'text' response_format is supported.", param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            if body.max_tokens != body.max_completion_tokens:
                raise APIError(400, "max_tokens and max_completion_tokens disagree.", param="max_completion_tokens")
        session = session_from(body.session_id, request.headers.get("x-session-id"))
        prompt = self.frontend.chat_prompt(body)
        params = CHAT_PARAMS
        max_tokens = body.max_tokens
        if body.max_completion_tokens is not None:
            params, max_tokens = {**CHAT_PARAMS, "max_tokens": "max_completion_tokens"}, body.max_completion_tokens
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request_id = new_id("chatcmpl")
        generation = self.frontend.generation_request(body, prompt, max_tokens, top_logprobs, owner, session, request_id)
        stream = await EngineStream.open(self.watch, generation, params)
        created = int(time.time())
        headers = {"X-Session-Id": session} if session else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._chat_chunks(stream, request_id, created, body, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        choices, usage = await _collect([stream], body.n)
        result = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": self.info.name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(c["text"])},
                    "logprobs": {"content": self._chat_logprobs(c["events"])} if body.logprobs else None,
                    "finish_reason": c["finish_reason"],
                }
                for i, c in choices.items()
            ],
            "usage": usage_body(usage),
        }
        if session:
            result["session_id"] = session
        return JSONResponse(result, headers=headers)

    def _chat_logprobs(self, events: list[TokenEvent]) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            token = self.frontend.token_string(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return [
            {**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
            for e in events
        ]

    async def _chat_chunks(self, stream: EngineStream, request_id: str, created: int,
                           body: ChatCompletionRequest, include_usage: bool) -> AsyncIterator[str]:
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.info.name}
        extra = {"usage": None} if include_usage else {}
        try:
            yield "".join(
                sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}], **extra})
                for i in range(body.n)
            )
            async for batch in stream:
                out = []
                for index, events in _by_choice(batch.events).items():
                    text = "".join(e.text for e in events)
                    choice = {
                        "index": index,
                        "delta": {"content": text} if text else {},
                        "logprobs": {"content": self._chat_logprobs(events)} if body.logprobs else None,
                        "finish_reason": events[-1].finish_reason,
                    }
                    out.append(sse({**base, "choices": [choice], **extra}))
                if batch.usage is not None and include_usage:
                    out.append(sse({**base, "choices": [], "usage": usage_body(batch.usage)}))
                if out:
                    yield "".join(out)
        except APIError as error:
            yield sse(error.body())
        yield sse("[DONE]")


def _by_choice(events: list[TokenEvent]) -> dict[int, list[TokenEvent]]:
    grouped: dict[int, list[TokenEvent]] = {}
    for event in events:
        grouped.setdefault(event.choice, []).append(event)
    return grouped


# Applied here, at import, so that every process that imports this module (the replicas do) sees the
# class-based routes with `self` injected.
OpenAIIngress = serve.ingress(app)(OpenAIServerImpl)


async def _collect(streams: list[EngineStream], n: int) -> tuple[dict[int, dict], Usage]:
    """Whole (non-streamed) answers: per choice (index = prompt * n + choice, as OpenAI numbers them) its
    text pieces, events and finish reason; the usage summed over the prompts."""
    choices = {i: {"text": [], "events": [], "finish_reason": None} for i in range(n * len(streams))}
    usages: list[Usage] = []
    async for prompt, batch in merged(streams):
        for event in batch.events:
            choice = choices[prompt * n + event.choice]
            choice["text"].append(event.text)
            choice["events"].append(event)
            choice["finish_reason"] = event.finish_reason or choice["finish_reason"]
        if batch.usage is not None:
            usages.append(batch.usage)
    return choices, total_usage(usages)
