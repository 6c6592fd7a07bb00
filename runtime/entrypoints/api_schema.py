"""The request bodies of the HTTP routes as pydantic models, for `/openapi.json` only.

The routes parse their bodies themselves (`http_io.read_json`, then `GenerateRequest.from_body`
and `openai_params.py`), so that every error names the field as the client spelled it; these
models describe the same bodies to OpenAPI tools (`request_body` attaches one to a route).
tests/runtime/test_api_schema.py keeps them true: the same fields as the parsers accept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

Stop = str | list[str] | None
MaxN = 128  # protocol.MAX_N
Text = Annotated[str, Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, description="ids below the vocabulary size")]
TokenIdLists = Annotated[list[TokenIds], Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParamsBody(_Body):
    """SGLang's `sampling_params`; null means the default."""

    max_new_tokens: int | None = Field(None, ge=0, description="default 128; null: until the context is full")
    min_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: disabled")
    min_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    seed: int | None = None
    sampling_seed: int | None = Field(None, description="SGLang's name for seed")
    n: int | None = Field(None, ge=1, le=MaxN, description="samples per prompt")
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = Field(None, description="a JSON Schema, as an object or a JSON string")
    ebnf: str | None = Field(None, description="a GBNF grammar, start rule `root`")
    lark: str | None = Field(None, description="a Lark grammar, start rule `start`")
    stream_interval: int | None = Field(None, ge=1, description="accepted and ignored")
    stop_regex: None = Field(None, description="not supported: null or empty only")
    structural_tag: None = Field(None, description="not supported: null or empty only")
    logit_bias: None = Field(None, description="not supported: null or empty only")
    custom_params: None = Field(None, description="not supported: null or empty only")


class GenerateBody(_Body):
    """SGLang's /generate: one prompt, or a batch when `text` / `input_ids` is a list (of
    prompts); the other fields then take one value for all prompts or a list of one per prompt."""

    text: Text | Texts | None = Field(None, description="give text or input_ids, not both")
    input_ids: TokenIds | TokenIdLists | None = None
    sampling_params: SamplingParamsBody | list[SamplingParamsBody | None] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = Field(None, description="-1: output tokens only")
    top_logprobs_num: int | list[int] | None = Field(None, ge=0)
    return_text_in_logprobs: bool | None = None
    stream: bool | None = Field(None, description="server-sent events of cumulative text, then `data: [DONE]`")
    rid: str | list[str] | None = Field(None, description="request id(s), for /abort_request")
    reject_invalid: bool | None = Field(None, description="false: an invalid grammar is an aborted result, not a 400")
    image_data: Any = Field(None, description="accepted and ignored (text-only engine)")
    lora_path: Any = Field(None, description="accepted and ignored")
    custom_logit_processor: Any = Field(None, description="accepted and ignored")
    bootstrap_host: Any = Field(None, description="accepted and ignored")
    modalities: Any = Field(None, description="accepted and ignored")
    log_metrics: Any = Field(None, description="accepted and ignored")


class AbortBody(_Body):
    rid: str = Field(min_length=1)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _OpenAIBody(_Body):
    model: str | None = Field(None, description="the served model's name (default: it)")
    stream: bool | None = None
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    n: int | None = Field(None, ge=1, le=MaxN)
    stop: Stop = None
    max_tokens: int | None = Field(None, ge=0, description="must fit in the context after the prompt")
    max_completion_tokens: int | None = Field(None, ge=0, description="max_tokens' newer name")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = Field(None, description="accepted and ignored")
    # SGLang's extras (the openai client's extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    ignore_eos: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    regex: str | None = None
    ebnf: str | None = None
    lark: str | None = None
    json_schema: str | dict[str, Any] | None = None
    rid: str | None = Field(None, min_length=1)


class CompletionBody(_OpenAIBody):
    prompt: Text | Texts | TokenIds | TokenIdLists
    logprobs: int | None = Field(None, ge=0, le=20, description="top tokens per position")
    top_logprobs: None = Field(None, description="chat only; here `logprobs` is the count")
    echo: bool | None = Field(None, description="not supported: false only")
    suffix: str | None = Field(None, description="not supported: null or empty only")
    best_of: int | None = Field(None, ge=1, le=1, description="1 only")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="null or absent: empty")
    name: str | None = None


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema")


class ChatBody(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20, description="needs logprobs: true")
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(None, description="not supported: null or empty only")
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = Field(None, description="accepted and ignored")
    chat_template_kwargs: dict[str, str | int | float | bool | None] | None = Field(
        None, description="only variables of the model's chat template, e.g. enable_thinking; never `chat_template`")


REQUEST_MODELS: dict[str, type[BaseModel]] = {m.__name__: m for m in (GenerateBody, AbortBody, CompletionBody, ChatBody)}


def request_body(name: str) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON body is the model `name` (see `add_request_schemas`)."""
    assert name in REQUEST_MODELS, name
    schema = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def add_request_schemas(app: FastAPI) -> None:
    """Make `app.openapi()` carry the request models (and the models they use) as components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, model in REQUEST_MODELS.items():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
                schemas.update(schema.pop("$defs", {}))
                schemas[name] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
