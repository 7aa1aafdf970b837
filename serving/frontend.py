"""From a validated OpenAI request to an engine GenerationRequest: prompts (text, token ids or chat
messages through the template), the parameters the engine does not take, sampling; and token strings
for logprobs. Shared by the HTTP and gRPC ingresses. The context length is the engine's to check."""

from __future__ import annotations

import uuid

from model.sampling import SamplingParams

from .errors import APIError
from engine.generation import GenerationRequest
from .model_info import ModelInfo
from .schemas import ChatCompletionRequest, CompletionRequest, GenerationParams

# Which request parameter an engine error about a GenerationRequest field is about.
COMPLETION_PARAMS = {"prompt_ids": "prompt", "max_tokens": "max_tokens"}
CHAT_PARAMS = {"prompt_ids": "messages", "max_tokens": "max_tokens"}
MAX_PROMPTS = 64  # prompts in one completions request (each is its own engine request, with its n choices)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Frontend:
    """Prompt building and validation for one model."""

    def __init__(self, info: ModelInfo, tokenizer):
        self.info, self.tokenizer = info, tokenizer
        self._token_strings: dict[int, str] = {}

    # ---- the model --------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.info.name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.info.name!r}.",
                           param="model", code="model_not_found")

    # ---- prompts ----------------------------------------------------------------------------------
    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        """The token ids of each prompt: the request's `prompt` is text, token ids, or a list of either
        (several prompts, which OpenAI's API takes in one request)."""
        prompt = request.prompt
        several = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
        prompts = prompt if several else [prompt]
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"At most {MAX_PROMPTS} prompts in one request.", param="prompt")
        return [self._completion_ids(p) for p in prompts]

    def _completion_ids(self, prompt: str | list[int]) -> list[int]:
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
        return ids

    # ---- the engine request -----------------------------------------------------------------------
    def generation_request(
        self,
        params: GenerationParams,
        prompt_ids: list[int],
        max_tokens: int | None,
        top_logprobs: int | None,
        owner: str,
        session_id: str | None,
        request_id: str,
    ) -> GenerationRequest:
        if params.logit_bias:
            raise APIError(400, "logit_bias is not supported.", param="logit_bias")
        stops = params.stops()
        if stops and self.tokenizer is None:
            raise APIError(400, "stop sequences need a tokenizer; this model has none (use stop_token_ids).",
                           param="stop")
        for token in params.stop_token_ids or []:
            if not 0 <= token < self.info.vocab_size:
                raise APIError(400, f"stop_token_ids must be in [0, {self.info.vocab_size}).", param="stop_token_ids")
        sampling = SamplingParams(
            temperature=1.0 if params.temperature is None else params.temperature,
            top_p=1.0 if params.top_p is None else params.top_p,
            top_k=max(0, params.top_k or 0),
            seed=params.seed,
            presence_penalty=params.presence_penalty or 0.0,
            frequency_penalty=params.frequency_penalty or 0.0,
            top_logprobs=top_logprobs,
        )
        return GenerationRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            n=params.n,
            sampling=sampling,
            stop=stops,
            stop_token_ids=list(params.stop_token_ids or []),
            owner=owner,
            session_id=session_id,
        )

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
