"""What the HTTP (OpenAI) and gRPC ingresses share: OpenAI-shaped errors, request schemas, API keys,
tokenization, and the translation of a validated request into an engine `GenerationRequest`.

Nothing here imports Ray: the ingress deployments hold a `Frontend` and call the engine deployment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger("ray.serve")

API_KEYS_ENV = "MOERAY_API_KEYS"  # comma-separated
MAX_N = 16
MAX_STOP = 8
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_LOGPROBS = 20
BUNDLED_TOKENIZER_MAX_VOCAB = 4096  # folders without tokenizer.json up to this vocab use the built-in one
SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
INT64 = 2**63


# ---- errors -------------------------------------------------------------------------------------
class APIError(Exception):
    """An error with its HTTP status and OpenAI error body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_dict(self) -> dict:
        return {"status": self.status, **self.body()["error"]}

    @classmethod
    def from_dict(cls, payload: dict) -> "APIError":
        return cls(payload["status"], payload["message"], payload["type"], payload.get("param"), payload.get("code"))


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key.", "authentication_error", None, "invalid_api_key")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def validation_error(error: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the first offending parameter."""
    first = error.errors(include_url=False)[0]
    path = []
    for part in first.get("loc", ()):
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith("function-")):
            break  # pydantic names the union member that failed; the parameter is what came before
        path.append(str(part))
    param = ".".join(path) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {message}", code="invalid_json")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


# ---- API keys -----------------------------------------------------------------------------------
class KeyRing:
    """Valid API keys (from arguments and MOERAY_API_KEYS). Empty = no authentication.

    A request's owner is a digest of its key: sessions belong to the key that created them, and no
    key travels further than the ingress."""

    def __init__(self, keys: list[str] | str | None = None, read_env: bool = True, digests: list[str] = ()):
        if isinstance(keys, str):
            keys = keys.split(",")
        found = [k.strip() for k in (keys or []) if k and k.strip()]
        if read_env:
            found += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        self.digests = {self.owner_of(k) for k in found} | set(digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    @staticmethod
    def owner_of(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def check(self, key: str | None) -> str:
        """The owner of a valid key; raises a 401 otherwise. Without keys everyone is owner ""."""
        if not self.enabled:
            return ""
        if not key:
            raise unauthorized()
        digest = self.owner_of(key)
        if not any(hmac.compare_digest(digest, valid) for valid in self.digests):
            raise unauthorized()
        return digest

    @staticmethod
    def key_from_headers(headers: dict[str, str]) -> str | None:
        """`Authorization: Bearer <key>` (what OpenAI clients send) or `X-Api-Key: <key>`."""
        authorization = headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        return headers.get("x-api-key") or None


# ---- request schemas ----------------------------------------------------------------------------
class _Strict(BaseModel):
    # Unknown fields are ignored (clients send many); known ones are type-checked without coercion.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationParams(_Strict):
    model: str = Field(min_length=1, max_length=256)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="extension (as vLLM): 0 or -1 = off")
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN, description="extension: the session to continue")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="extension")
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_GenerationParams):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            raise APIError(400, f"messages[{index}].content is missing", param=f"messages.{index}.content")
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(
                    400, f"messages[{index}]: only text content parts are supported, not {part.type!r}",
                    param=f"messages.{index}.content",
                )
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


def parse_request(model: type[BaseModel], body: bytes | dict) -> Any:
    """Validate a request body (JSON bytes, or a dict from the gRPC ingress); any problem is a 400."""
    if isinstance(body, dict):
        try:
            return model.model_validate(body)
        except ValidationError as error:
            raise validation_error(error) from None
    if not body:
        raise APIError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        decoded = json.loads(body)  # a clear "invalid JSON" first, then the schema
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"The request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(decoded, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise validation_error(error) from None


# ---- tokenization -------------------------------------------------------------------------------
def resolve_model_dir(path: str | Path) -> Path:
    """An absolute folder, a folder relative to the working directory, or one relative to this
    project (so configs can say `checkpoints/tiny-random` wherever a replica runs)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / candidate / "config.json").exists():
            return (base / candidate).resolve()
    return candidate.resolve()


def load_serving_tokenizer(model_dir: str | Path, mode: str, vocab_size: int):
    """The folder's tokenizer.json (+ tokenizer_config.json and its chat template); for folders without
    one, the built-in tokenizer of the tiny models when the vocabulary is small enough to be one of
    them; else None (completions then take token-id prompts and chat is unavailable).

    mode: "auto" | "bundled" | "none"."""
    from model.tokenizer import TOKENIZER_FILE, ChatTokenizer, build_char_tokenizer

    directory = Path(model_dir)
    if mode == "none":
        return None
    if mode == "auto" and (directory / TOKENIZER_FILE).exists():
        return ChatTokenizer.from_pretrained(directory)
    bundled_size = build_char_tokenizer().get_vocab_size()
    if mode == "bundled" or (mode == "auto" and bundled_size <= vocab_size <= BUNDLED_TOKENIZER_MAX_VOCAB):
        if vocab_size < bundled_size:
            raise ValueError(f"the built-in tokenizer needs a vocabulary of at least {bundled_size} tokens")
        return ChatTokenizer.bundled(vocab_size)
    return None


class ModelInfo(BaseModel):
    name: str
    max_model_len: int
    vocab_size: int
    created: int
    eos_token_ids: list[int] = []
    has_tokenizer: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Frontend:
    """Prompt building and validation for one model; shared by the HTTP and gRPC ingresses."""

    def __init__(self, info: ModelInfo, tokenizer, default_max_tokens: int = 256):
        self.info, self.tokenizer, self.default_max_tokens = info, tokenizer, default_max_tokens
        self._token_strings: dict[int, str] = {}

    # ---- the model --------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.info.name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.info.name!r}.",
                           param="model", code="model_not_found")

    # ---- prompts ----------------------------------------------------------------------------------
    def completion_prompt(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "Batched prompts are not supported; send one prompt per request.", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, f"The model {self.info.name!r} has no tokenizer; send the prompt as token ids.",
                               param="prompt", code="tokenizer_unavailable")
            ids = self.tokenizer.tokenizer.encode(prompt, add_special_tokens=True).ids
        else:
            ids = list(prompt)
        return self._check_ids(ids, "prompt")

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, f"The model {self.info.name!r} has no tokenizer, so no chat template; use "
                           "/v1/completions with token ids.", param="messages", code="tokenizer_unavailable")
        messages = []
        for index, message in enumerate(request.messages):
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": message.text(index)})
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as error:  # a template may raise on conversations it does not accept
            raise APIError(400, f"The chat template rejected the messages: {error}", param="messages") from None
        return self._check_ids(self.tokenizer.encode(text), "messages")

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "The prompt is empty.", param=param)
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"Prompt token ids must be in [0, {vocab}).", param=param)
        if len(ids) >= self.info.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.info.max_model_len} tokens; the "
                           f"prompt has {len(ids)}.", param=param, code="context_length_exceeded")
        return ids

    # ---- the engine request -----------------------------------------------------------------------
    def max_tokens(self, requested: int | None, prompt_len: int, param: str = "max_tokens") -> int:
        limit = self.info.max_model_len
        room = limit - prompt_len
        if requested is None:
            return max(1, min(self.default_max_tokens, room))
        if requested > limit:
            raise APIError(400, f"{param} is {requested}, more than this model's context of {limit} tokens.",
                           param=param, code="invalid_value")
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                           f"{prompt_len} and {param} asks for {requested}.", param=param,
                           code="context_length_exceeded")
        return requested

    def generation_request(
        self,
        params: _GenerationParams,
        prompt_ids: list[int],
        max_tokens: int,
        top_logprobs: int | None,
        owner: str,
        session_id: str | None,
        request_id: str,
    ) -> dict:
        if params.logit_bias:
            raise APIError(400, "logit_bias is not supported.", param="logit_bias")
        stops = params.stops()
        if stops and self.tokenizer is None:
            raise APIError(400, "stop sequences need a tokenizer; this model has none (use stop_token_ids).",
                           param="stop")
        for token in params.stop_token_ids or []:
            if not 0 <= token < self.info.vocab_size:
                raise APIError(400, f"stop_token_ids must be in [0, {self.info.vocab_size}).", param="stop_token_ids")
        sampling = {
            "temperature": 1.0 if params.temperature is None else params.temperature,
            "top_p": 1.0 if params.top_p is None else params.top_p,
            "top_k": max(0, params.top_k or 0),
            "seed": params.seed,
            "presence_penalty": params.presence_penalty or 0.0,
            "frequency_penalty": params.frequency_penalty or 0.0,
            "top_logprobs": top_logprobs,
        }
        return {
            "request_id": request_id,
            "prompt_ids": prompt_ids,
            "max_tokens": max_tokens,
            "n": params.n,
            "sampling": sampling,
            "stop": stops,
            "stop_token_ids": list(params.stop_token_ids or []),
            "owner": owner,
            "session_id": session_id,
        }

    # ---- output -----------------------------------------------------------------------------------
    def token_string(self, token_id: int) -> str:
        text = self._token_strings.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_strings) < 1_000_000:
                self._token_strings[token_id] = text
        return text


def session_from(body_session: str | None, header_session: str | None) -> str | None:
    """The session a request names: the `session_id` field or the X-Session-Id header (not two different)."""
    if header_session is not None and not re.match(SESSION_ID_PATTERN, header_session):
        raise APIError(400, "X-Session-Id must be 1-128 characters of [A-Za-z0-9._:-].", param="X-Session-Id")
    if body_session and header_session and body_session != header_session:
        raise APIError(400, "session_id and the X-Session-Id header name different sessions.", param="session_id")
    return body_session or header_session


# ---- the engine stream --------------------------------------------------------------------------
class EngineStream:
    """A streaming call to the engine replica, opened only once its first batch is known to be no error
    (so a bad request is a plain 4xx, never a broken stream)."""

    def __init__(self, first: dict, stream):
        self.first, self.stream, self.done = first, stream, False

    @classmethod
    async def open(cls, engine, generation_request: dict) -> "EngineStream":
        stream = engine.generate.options(stream=True).remote(generation_request)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "The engine ended the stream without a result.", "server_error") from None
        except APIError:
            raise
        except Exception as error:
            stream.cancel()
            logger.warning("engine call failed: %r", error)
            raise APIError(503, "The engine is unavailable; try again.", "server_error", code="engine_unavailable") from None
        if first.get("error"):
            raise APIError.from_dict(first["error"])
        return cls(first, stream)

    async def __aiter__(self) -> AsyncIterator[dict]:
        try:
            batch = self.first
            while True:
                if batch.get("error"):
                    raise APIError.from_dict(batch["error"])
                yield batch
                if batch.get("usage") is not None:
                    self.done = True
                    return
                try:
                    batch = await self.stream.__anext__()
                except StopAsyncIteration:
                    self.done = True
                    raise APIError(500, "The engine ended the stream early.", "server_error") from None
                except Exception as error:  # the engine replica went away mid-stream
                    logger.warning("engine stream failed: %r", error)
                    raise APIError(503, "The engine failed during generation; try again.", "server_error",
                                   code="engine_unavailable") from None
        finally:
            if not self.done:
                self.stream.cancel()
