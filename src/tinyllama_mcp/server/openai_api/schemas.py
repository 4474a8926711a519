"""The /v1 request bodies as pydantic models.

Unknown fields are accepted and ignored (clients send extras: `user`, `metadata`, `store`, penalties, ...);
a known field of the wrong type or out of range is a 400 naming it. Unions that OpenAI allows (`stop` as a string
or a list, `prompt` as text or token ids, message `content` as a string or text parts) are normalised here, so the
handlers see one form each.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

SEED_MAX = 2**32 - 1
MAX_N = 16  # choices per request; each is a request of its own to the engine
MAX_PROMPTS = 2048  # prompts of one completions request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Body):
    name: str = Field(..., min_length=1, max_length=64)
    arguments: Union[str, dict[str, Any]] = "{}"


class ToolCall(_Body):
    id: Optional[str] = Field(None, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


def _text_of(content: Any) -> Optional[str]:
    """A message's content as one string: text parts joined with newlines; other parts refused."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text") \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content part of type {kind!r} is not supported; this model reads text parts only")
        texts.append(part["text"])
    return "\n".join(texts)


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Any] = None
    tool_calls: Optional[list[ToolCall]] = Field(None, max_length=128)
    tool_call_id: Optional[str] = Field(None, max_length=256)

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> Optional[str]:
        return _text_of(value)

    @model_validator(mode="after")
    def _needs_content(self) -> "Message":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a message with role {self.role!r} needs content (only an assistant message with tool_calls may "
                             "leave it null)")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it (OpenAI's fine-tuning format; developer is a system turn)."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.content if self.content is not None else ""}
        if self.role == "assistant" and self.tool_calls:
            out["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}
                for call in self.tool_calls
            ]
        if self.role == "tool" and self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return [s for s in value if s]
    raise ValueError("stop must be a string or a list of strings")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str = Field(..., min_length=1, max_length=4096)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    stop: Any = Field(None, validate_default=True)
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        return _stop_list(value)

    @field_validator("n")
    @classmethod
    def _seeds_fit(cls, value: int, info: ValidationInfo) -> int:
        seed = info.data.get("seed")
        if seed is not None and seed + value - 1 > SEED_MAX:
            raise ValueError(f"seed + n - 1 must be at most {SEED_MAX} (choice i is seeded with seed + i)")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(..., min_length=1, max_length=1024)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[dict[str, Any]]] = Field(None, max_length=128)
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tools_active(self) -> bool:
        """Whether the answer may hold tool calls (to parse)."""
        return bool(self.tools) and self.tool_choice != "none"


def _prompts(value: Any) -> list[Union[str, list[int]]]:
    """`prompt` as a list of prompts, each a string or a list of token ids."""
    def ids(item: Any) -> Optional[list[int]]:
        if isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            return item
        return None

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and len(value) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request; send the rest in further requests")
    if isinstance(value, list) and value:
        if ids(value) is not None:
            return [value]
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(ids(item) is not None for item in value):
            return list(value)
    raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                     "(none empty)")


class CompletionRequest(_Sampling):
    prompt: Any
    max_tokens: int = Field(16, ge=0)  # OpenAI's default for completions; 0 scores the prompt only (with echo)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> list[Union[str, list[int]]]:
        return _prompts(value)


class TokenizeRequest(_Body):
    model: str = Field(..., min_length=1, max_length=4096)
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = Field(None, min_length=1, max_length=1024)
    tools: Optional[list[dict[str, Any]]] = Field(None, max_length=128)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str = Field(..., min_length=1, max_length=4096)
    tokens: list[int] = Field(..., max_length=1_000_000)
