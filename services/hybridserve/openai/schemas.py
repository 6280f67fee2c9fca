"""The request bodies the API accepts, in OpenAI's shapes.

Fields OpenAI defines that the platform does not implement are refused with a 400
that names them when they are set to anything but their default (a client that asks
for `n: 2` or tools must not get one plain answer silently); every other unknown field
is ignored, as OpenAI does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hybridserve.errors import InvalidArgument


class _Body(BaseModel):
    # Unknown fields are ignored (OpenAI's own behaviour); known ones are typed.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormatSchema(_Body):
    name: str = ""
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: ResponseFormatSchema | None = None


class Filter(_Body):
    field: str
    op: Literal["equal", "not_equal", "any_of"]
    values: list[str] = Field(default_factory=list, max_length=256)


class RagOptions(_Body):
    """The `rag` extension: answer from the tenant's documents (the Ask pipeline)."""

    tenant: str = ""
    top_k: int | None = None
    alpha: float | None = None
    filters: list[Filter] = Field(default_factory=list, max_length=64)
    rerank: bool | None = None
    top_n: int | None = None
    min_score: float | None = None
    #: Each source's whole text as the prompt held it (not only the snippet).
    include_passages: bool = False


class TextPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: str | Annotated[list[TextPart], Field(max_length=1024)] | None = None

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        parts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise InvalidArgument(
                    f"messages[{index}].content[{j}] is of type {part.type!r}; only text parts "
                    "are supported", field_violations=[(f"messages[{index}].content", "text only")])
            parts.append(part.text)
        return "".join(parts)


class _Sampling(_Body):
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=64)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: int | None = None
    rag: RagOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        return [v] if isinstance(v, str) else v

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None

    #: Set to anything but these defaults, a field is refused (not implemented).
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"logprobs": (None, False), "top_logprobs": (None, 0),
                   "tools": (None, []), "functions": (None, []),
                   "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                   "logit_bias": (None, {}), "audio": (None,), "prediction": (None,),
                   "parallel_tool_calls": (None, True, False), "tool_choice": (None, "none", "auto"),
                   "modalities": (None, ["text"])}

    def token_limit(self) -> int | None:
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_completion_tokens != self.max_tokens:
            raise InvalidArgument("max_tokens and max_completion_tokens differ; send one",
                                  field_violations=[("max_completion_tokens", "one of the two")])
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def json_schema(self) -> str:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return ""
        if rf.type == "json_object":
            return '{"type": "object"}'
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise InvalidArgument("response_format json_schema needs json_schema.schema",
                                  field_violations=[("response_format.json_schema.schema",
                                                     "required")])
        return json.dumps(rf.json_schema.schema_)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
                   "best_of": (None, 1), "presence_penalty": (None, 0, 0.0),
                   "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}

    def token_limit(self) -> int | None:
        # OpenAI's default for completions is 16 tokens; ours is the platform's default.
        return self.max_tokens

    def json_schema(self) -> str:
        return ""


class EmbeddingRequest(_Body):
    model: str = ""
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(None, max_length=256)


def parse(cls: type[_Body], data: Any) -> Any:
    """`data` (parsed JSON) as `cls`, or InvalidArgument naming the first bad field."""
    if not isinstance(data, dict):
        raise InvalidArgument("the request body must be a JSON object")
    try:
        body = cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidArgument(f"{where}: {first['msg']}",
                              field_violations=[(where, first["msg"])]) from None
    for name, defaults in getattr(cls, "UNSUPPORTED", {}).items():
        if name in data and data[name] not in defaults:
            raise InvalidArgument(f"{name} is not supported by this server; leave it unset",
                                  field_violations=[(name, "not supported")],
                                  reason="UNSUPPORTED_PARAMETER")
    n = getattr(body, "n", None)
    if n is not None and n != 1:
        raise InvalidArgument(f"n must be 1 (one choice per request), got {n}; send n "
                              "requests instead", field_violations=[("n", "must be 1")],
                              reason="UNSUPPORTED_PARAMETER")
    return body
