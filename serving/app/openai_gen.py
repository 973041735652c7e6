"""OpenAI completions and chat, the pure half: a body into a GenCall, chat rendering, response and SSE shapes.

No Ray and no engine here: the routes (POST /v1/completions, POST /v1/chat/completions) call these.
parse_completion / parse_chat read a body as OpenAI defines it and raise InvalidParam (400, OpenAI's
`invalid_request_error` with `param` naming the field) for any bad value; unknown fields are ignored, and known
fields polyhead cannot honour (tools, response_format json, logit_bias, echo, ...) are refused by name, never
silently dropped. Any JSON value in any field gives a GenCall or an InvalidParam, nothing else.

Differences from OpenAI, by design:
    - role "developer" is rendered as "system" (chat templates know system); roles tool/function are refused;
    - text content parts are joined with "\\n" (as vLLM does); any other part type is refused by name;
    - seed takes OpenAI's int64 range and is folded into the engine's [0, 2^63) (seed & (2^63 - 1));
    - extensions: top_k (>= 0; -1 = off, as vLLM), ignore_eos (bool);
    - max_tokens None = up to the context (OpenAI's legacy completions default to 16: the route decides).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from serving.generation.sampling import MAX_LOGPROBS, MAX_SEED, MAX_STOP_CHARS, SamplingParams

from .errors import STATUS_TYPES, ApiError

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_COMPLETION_LOGPROBS = 5  # completions: logprobs in [0, 5]
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when temperature is absent or null
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # body -> template
FINISH_REASONS = (None, "stop", "length")
NO_LOGPROB = -9999.0  # what OpenAI reports for a token of probability 0 (JSON has no -Infinity)

# Known fields polyhead does not implement: field -> (the values that mean "not used", why it is refused).
UNSUPPORTED = {
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "parallel_tool_calls": ((None,), "tool calling is not supported"),
    "response_format": ((None, {"type": "text"}), 'only {"type": "text"} is supported (no JSON mode or schemas)'),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), 'only ["text"] is supported'),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "reasoning_effort": ((None,), "the model does not reason"),
    "min_p": ((None, 0), "min_p is not supported"),  # vLLM's extensions, refused unless at their defaults
    "repetition_penalty": ((None, 1), "repetition_penalty is not supported: use presence/frequency_penalty"),
    "min_tokens": ((None, 0), "min_tokens is not supported"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "guided_json": ((None,), "guided decoding is not supported"),
    "guided_regex": ((None,), "guided decoding is not supported"),
    "guided_choice": ((None,), "guided decoding is not supported"),
    "guided_grammar": ((None,), "guided decoding is not supported"),
}
UNSUPPORTED_COMPLETION = {
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
}
UNSUPPORTED_PARTS = ("image_url", "input_audio", "file", "refusal")  # content part types: refused by name


class InvalidParam(ApiError):
    """A 400 for one field of a completions/chat body; `param` names it (e.g. "temperature",
    "messages[2].content"), as OpenAI's {"error": {"message", "type", "code", "param"}} does."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value"):
        super().__init__(400, message, code)
        self.param = param


def error_json(exc: ApiError) -> dict:
    """OpenAI's error body for an ApiError, with `param` (None unless it is an InvalidParam)."""
    return {"error": {"message": exc.message, "type": STATUS_TYPES.get(exc.status, "server_error"),
                      "code": exc.code, "param": getattr(exc, "param", None)}}


@dataclass(frozen=True)
class GenLimits:
    max_tokens: int  # the most tokens one request may ask for (max_tokens, max_completion_tokens): the context
    max_n: int = 8  # choices per prompt
    max_prompts: int = 64  # prompts in one completions body
    vocab_size: int | None = None  # token ids in a prompt must be below it (None: below 2^31; the engine checks)

    def __post_init__(self):
        for name in ("max_tokens", "max_n", "max_prompts") + (("vocab_size",) if self.vocab_size is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenLimits.{name} must be a positive int, got {value!r}")


@dataclass
class GenCall:
    model: str
    kind: str  # "completion" | "chat"
    prompts: list  # completion: each a str or a list[int]; chat: [messages], each {"role", "content": str[, "name"]}
    n: int = 1  # choices per prompt
    max_tokens: int | None = None  # None = up to the context
    sampling: SamplingParams = field(default_factory=SamplingParams)  # logprobs: None, 0 = chosen only, k = top-k
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage and no choices
    user: str | None = None
    echo: bool = False  # always False: echo is refused


# ---- reading fields -------------------------------------------------------------------------------------------

def _show(value) -> str:
    """A short description of a JSON value for a message (never the repr of a big or deep one)."""
    if isinstance(value, (list, dict)):
        return f"{'a list' if isinstance(value, list) else 'an object'} of {len(value)} items"
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(value, default) -> bool:
    """value == default, where true/false never equal 1/0."""
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def _real(body: dict, name: str, low: float, high: float, default: float, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    allowed = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)) \
            or not low <= value <= high or (open_low and value == low):
        raise InvalidParam(name, f"{name} must be a number in {allowed}, got {_show(value)}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None, note: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise InvalidParam(name, f"{name} must be {allowed}{note}, got {_show(value)}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidParam(name, f"{name} must be true or false, got {_show(value)}")
    return value


def _text(body: dict, name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if value is None:
        raise InvalidParam(name, f"{name} is required", "missing_required_parameter")
    if not isinstance(value, str) or (required and not value):
        raise InvalidParam(name, f"{name} must be a{' non-empty' if required else ''} string, got {_show(value)}")
    return value


def _refuse_unsupported(body: dict, table: dict) -> None:
    for name, (unused, why) in table.items():
        value = body.get(name)
        if not any(_same(value, d) for d in unused):
            code = "unsupported_parameter" if unused == (None,) else "unsupported_value"
            raise InvalidParam(name, f"{name} is not supported by polyhead: {why}", code)


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidParam("stop", f"stop must be a string or a list of strings, got {_show(value)}")
    if len(stop) > MAX_STOP:
        raise InvalidParam("stop", f"stop has {len(stop)} strings; at most {MAX_STOP} are allowed")
    for s in stop:
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidParam("stop", f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {_show(s)}")
    return tuple(stop)


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise InvalidParam("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(options, dict):
        raise InvalidParam("stream_options", f'stream_options must be an object like {{"include_usage": true}}, '
                           f"got {_show(options)}")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise InvalidParam("stream_options.include_usage",
                           f"stream_options.include_usage must be true or false, got {_show(usage)}")
    return stream, bool(usage)


def _sampling(body: dict, logprobs: int | None) -> SamplingParams:
    seed = _integer(body, "seed", -2**63, 2**63 - 1)
    top_k = _integer(body, "top_k", -1, note=" (0 or -1 = off)")
    return SamplingParams(
        temperature=_real(body, "temperature", 0, 2, DEFAULT_TEMPERATURE),
        top_p=_real(body, "top_p", 0, 1, 1.0, open_low=True),
        top_k=max(top_k or 0, 0),
        presence_penalty=_real(body, "presence_penalty", -2, 2, 0.0),
        frequency_penalty=_real(body, "frequency_penalty", -2, 2, 0.0),
        seed=None if seed is None else seed & MAX_SEED,
        stop=_stop(body),
        ignore_eos=_flag(body, "ignore_eos"),
        logprobs=logprobs)


def _common(body, kind: str, limits: GenLimits) -> dict:
    """The fields both routes share, in GenCall's terms (not prompts, max_tokens, sampling)."""
    model = _text(body, "model", required=True)
    _refuse_unsupported(body, UNSUPPORTED)
    n = _integer(body, "n", 1, limits.max_n)
    stream, include_usage = _stream(body)
    return dict(model=model, kind=kind, n=1 if n is None else n, stream=stream, include_usage=include_usage,
                user=_text(body, "user"))


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise InvalidParam(None, f"the body must be a JSON object, got {type(body).__name__}")
    return body


# ---- completions ----------------------------------------------------------------------------------------------

def _token_ids(value: list, param: str, vocab: int) -> list[int]:
    if not value:
        raise InvalidParam(param, f"{param} must not be an empty list of token ids")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise InvalidParam(param, f"{param} must hold token ids in [0, {vocab}), got {_show(t)}")
    return list(value)


def _prompts(body: dict, limits: GenLimits) -> list:
    value = body.get("prompt")
    if value is None:
        raise InvalidParam("prompt", "prompt is required", "missing_required_parameter")
    shape = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    vocab = limits.vocab_size or 2**31
    if isinstance(value, str):
        prompts = [value]
    elif not isinstance(value, list) or not value:
        raise InvalidParam("prompt", f"prompt must be {shape} (not empty), got {_show(value)}")
    elif all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif all(isinstance(t, int) for t in value):  # bool too: _token_ids refuses it by name
        prompts = [_token_ids(value, "prompt", vocab)]
    elif all(isinstance(p, list) for p in value):
        prompts = [_token_ids(p, f"prompt[{i}]", vocab) for i, p in enumerate(value)]
    else:
        raise InvalidParam("prompt", f"prompt must be {shape}; got a list that mixes kinds")
    for i, p in enumerate(prompts):
        if isinstance(p, str) and not p:
            raise InvalidParam("prompt", "prompt must not be an empty string" if len(prompts) == 1
                               else f"prompt[{i}] must not be an empty string")
    if len(prompts) > limits.max_prompts:
        raise InvalidParam("prompt", f"prompt holds {len(prompts)} prompts; at most {limits.max_prompts} are allowed")
    return prompts


def parse_completion(body: dict, *, limits: GenLimits) -> GenCall:
    """A POST /v1/completions body as a GenCall; InvalidParam (400, `param` = the field) for a bad one."""
    body = _object(body)
    common = _common(body, "completion", limits)
    prompts = _prompts(body, limits)
    _refuse_unsupported(body, UNSUPPORTED_COMPLETION)
    best_of = _integer(body, "best_of", 1, limits.max_n)
    if best_of is not None and best_of != common["n"]:
        raise InvalidParam("best_of", "best_of is not supported by polyhead: leave it out or equal to n",
                           "unsupported_value")
    logprobs = _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    return GenCall(prompts=prompts, max_tokens=_integer(body, "max_tokens", 1, limits.max_tokens),
                   sampling=_sampling(body, logprobs), **common)


# ---- chat -----------------------------------------------------------------------------------------------------

def _content(value, param: str) -> str:
    """A message's content (a string or a list of text parts) as one non-empty string, parts joined by "\\n"."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            where = f"{param}[{j}]"
            if not isinstance(part, dict):
                raise InvalidParam(where, f'{where} must be an object like {{"type": "text", "text": "..."}}, '
                                   f"got {_show(part)}")
            kind = part.get("type")
            if kind in UNSUPPORTED_PARTS:
                raise InvalidParam(f"{where}.type", f"{where} is a {kind!r} part: polyhead takes text parts only",
                                   "unsupported_value")
            if kind != "text":
                raise InvalidParam(f"{where}.type", f'{where}.type must be "text", got {_show(kind)}')
            if not isinstance(part.get("text"), str):
                raise InvalidParam(f"{where}.text", f"{where}.text must be a string, got {_show(part.get('text'))}")
            texts.append(part["text"])
        text = "\n".join(texts)
    elif value is None:
        raise InvalidParam(param, f"{param} is required", "missing_required_parameter")
    else:
        raise InvalidParam(param, f"{param} must be a string or a list of text parts, got {_show(value)}")
    if not text:
        raise InvalidParam(param, f"{param} must not be empty")
    return text


def _message(m, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise InvalidParam(where, f"{where} must be an object with role and content, got {_show(m)}")
    role = m.get("role")
    if role in ("tool", "function"):
        raise InvalidParam(f"{where}.role", f"{where}.role {role!r} is not supported by polyhead (no tool calling)",
                           "unsupported_value")
    if role not in ROLES:
        raise InvalidParam(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}")
    for key in ("tool_calls", "function_call", "audio"):
        if m.get(key) not in (None, []):
            raise InvalidParam(f"{where}.{key}", f"{where}.{key} is not supported by polyhead (no tools or audio)",
                               "unsupported_parameter")
    out = {"role": ROLES[role], "content": _content(m.get("content"), f"{where}.content")}
    name = m.get("name")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise InvalidParam(f"{where}.name", f"{where}.name must be a non-empty string, got {_show(name)}")
        out["name"] = name
    return out


def parse_chat(body: dict, *, limits: GenLimits) -> GenCall:
    """A POST /v1/chat/completions body as a GenCall (prompts = [messages], roles normalized, parts joined);
    InvalidParam (400, `param` = the field) for a bad one."""
    body = _object(body)
    common = _common(body, "chat", limits)
    messages = body.get("messages")
    if messages is None:
        raise InvalidParam("messages", "messages is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise InvalidParam("messages", f"messages must be a non-empty list of messages, got {_show(messages)}")
    messages = [_message(m, i) for i, m in enumerate(messages)]
    max_tokens = _integer(body, "max_tokens", 1, limits.max_tokens)
    newer = _integer(body, "max_completion_tokens", 1, limits.max_tokens)
    want_logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise InvalidParam("top_logprobs", "top_logprobs requires logprobs: true")
    return GenCall(prompts=[messages], max_tokens=newer if newer is not None else max_tokens,
                   sampling=_sampling(body, (top or 0) if want_logprobs else None), **common)


def render_chat(tokenizer, messages: list) -> str:
    """The prompt text of `messages` by the base's chat template (with the assistant's turn opened); raw messages
    are normalized as parse_chat normalizes them (parts joined, developer as system). InvalidParam (400) when the tokenizer has no chat template or the
    template refuses the messages (e.g. roles that must alternate)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParam("messages", "this model has no chat template: use /v1/completions with a prompt",
                           "no_chat_template")
    import jinja2  # transformers' template engine

    plain = [_message(m, i) for i, m in enumerate(messages)]  # as parse_chat leaves them (a no-op on its output)
    try:
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise InvalidParam("messages", f"the model's chat template refused the messages: {str(exc)[:200]}") from None


# ---- responses ------------------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    """A fresh response id: "cmpl-<hex>" (completion) or "chatcmpl-<hex>" (chat)."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _lp(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else NO_LOGPROB


def _finish(reason: str | None) -> str | None:
    if reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {reason!r}")
    return reason


def completion_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]] | None = None,
                        *, offset: int = 0) -> dict:
    """Completions' logprobs for generated tokens (token strings, their logprobs, per token the top k
    (token, logprob) best first or None for k = 0). text_offset counts characters from `offset`, the characters
    of the choice's text before these tokens (streaming: what was already sent). Each top_logprobs dict also
    holds the chosen token, as OpenAI's (up to k + 1 entries)."""
    text_offset, at = [], offset
    for t in tokens:
        text_offset.append(at)
        at += len(t)
    tops = []
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        d = {s: _lp(v) for s, v in (top[i] if top is not None and top[i] else ())}
        d.setdefault(t, _lp(lp))
        tops.append(d)
    return {"tokens": list(tokens), "token_logprobs": [_lp(v) for v in logprobs], "top_logprobs": tops,
            "text_offset": text_offset}


def chat_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]] | None = None) -> dict:
    """Chat's logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(t: str, lp: float) -> dict:
        return {"token": t, "logprob": _lp(lp), "bytes": list(t.encode("utf-8", "replace"))}

    content = [{**entry(t, lp), "top_logprobs": [entry(s, v) for s, v in (top[i] if top is not None and top[i]
                                                                           else ())]}
               for i, (t, lp) in enumerate(zip(tokens, logprobs))]
    return {"content": content, "refusal": None}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _finish(finish_reason)}


def chat_choice(index: int, content: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": logprobs, "finish_reason": _finish(finish_reason)}


def completion_response(model: str, choices: list[dict], usage: dict, *, id: str | None = None,
                        created: int | None = None) -> dict:
    """OpenAI's Completion: choices from completion_choice, usage from usage()."""
    return {"id": id or new_id("completion"), "object": "text_completion",
            "created": int(time.time()) if created is None else created, "model": model, "choices": choices,
            "usage": usage}


def chat_response(model: str, choices: list[dict], usage: dict, *, id: str | None = None,
                  created: int | None = None) -> dict:
    """OpenAI's ChatCompletion: choices from chat_choice, usage from usage()."""
    return {"id": id or new_id("chat"), "object": "chat.completion",
            "created": int(time.time()) if created is None else created, "model": model, "choices": choices,
            "usage": usage}


def completion_chunk(id: str, model: str, created: int, index: int, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None, *, include_usage: bool = False) -> dict:
    """One streamed completions event for choice `index` (text is the new piece)."""
    chunk = {"id": id, "object": "text_completion", "created": created, "model": model,
             "choices": [completion_choice(index, text, finish_reason, logprobs)]}
    return {**chunk, "usage": None} if include_usage else chunk


def chat_chunk(id: str, model: str, created: int, index: int, *, role: bool = False, content: str | None = None,
               finish_reason: str | None = None, logprobs: dict | None = None, include_usage: bool = False) -> dict:
    """One streamed chat event for choice `index`: role=True for a choice's first ({"role": "assistant",
    "content": ""}), content= for a piece ({"content": piece}), neither for the last (an empty delta, with the
    finish_reason). With include_usage every chunk has "usage": null, as OpenAI's."""
    if role:
        delta = {"role": "assistant", "content": content or ""}
    else:
        delta = {} if content is None else {"content": content}
    chunk = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": _finish(finish_reason)}]}
    return {**chunk, "usage": None} if include_usage else chunk


def usage_chunk(kind: str, id: str, model: str, created: int, usage: dict) -> dict:
    """The last event before [DONE] when stream_options.include_usage: no choices, the request's usage."""
    return {"id": id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}


SSE_DONE = b"data: [DONE]\n\n"


def sse(obj) -> bytes:
    """One server-sent event: b"data: {json}\\n\\n" (UTF-8, compact)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return b"data: " + text.encode("utf-8", "replace") + b"\n\n"


def sse_error(message: str, type: str = "server_error", code: str | None = None) -> bytes:
    """An error event for a stream already started (its status line is sent): OpenAI's error body as data."""
    return sse({"error": {"message": message, "type": type, "code": code, "param": None}})
