"""serving/app/openai_gen.py: OpenAI completions/chat bodies, chat rendering, response and SSE shapes (no Ray)."""
from __future__ import annotations

import json
import math
import random

import pytest
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serving.app.errors import ApiError
from serving.app.openai_gen import (SSE_DONE, GenCall, GenLimits, InvalidParam, chat_choice, chat_chunk,
                                    chat_logprobs, chat_response, completion_choice, completion_chunk,
                                    completion_logprobs, completion_response, error_json, new_id, parse_chat,
                                    parse_completion, render_chat, sse, sse_error, usage, usage_chunk)
from serving.generation.sampling import SamplingParams

LIMITS = GenLimits(max_tokens=2048, max_n=4, max_prompts=8, vocab_size=1000)
DROP = object()  # a key to remove from the good body
COMPLETION = {"model": "m", "prompt": "Hello"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
PARSE = {"completion": parse_completion, "chat": parse_chat}


def body_with(kind: str, **changes) -> dict:
    body = dict(COMPLETION if kind == "completion" else CHAT)
    for key, value in changes.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def user(content) -> dict:
    return {"role": "user", "content": content}


BAD = [  # (kind, changes, the param the error names)
    ("completion", {"prompt": DROP}, "prompt"),
    ("chat", {"messages": DROP}, "messages"),
    ("completion", {"model": DROP}, "model"),
    ("chat", {"model": ""}, "model"),
    ("chat", {"model": 7}, "model"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}]}, "messages[0].role"),
    ("chat", {"messages": [{"content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": [user("")]}, "messages[0].content"),
    ("chat", {"messages": [user([])]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("chat", {"messages": [user([{"type": "text", "text": 5}])]}, "messages[0].content[0].text"),
    ("chat", {"messages": [user(["just a string"])]}, "messages[0].content[0]"),
    ("chat", {"messages": [user([{"type": "image_url", "image_url": {"url": "http://x/a.png"}}])]},
     "messages[0].content[0].type"),
    ("chat", {"messages": [user(7)]}, "messages[0].content"),
    ("chat", {"messages": {"role": "user", "content": "x"}}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": ["hello"]}, "messages[0]"),
    ("chat", {"messages": [user("a"), {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
     "messages[1].tool_calls"),
    ("chat", {"messages": [{"role": "user", "content": "a", "name": 3}]}, "messages[0].name"),
    ("chat", {"n": 0}, "n"),
    ("completion", {"n": 5}, "n"),
    ("chat", {"n": True}, "n"),
    ("completion", {"max_tokens": -1}, "max_tokens"),
    ("completion", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_tokens": 2049}, "max_tokens"),
    ("chat", {"max_tokens": 1.5}, "max_tokens"),
    ("completion", {"max_tokens": True}, "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"max_completion_tokens": 10**30}, "max_completion_tokens"),
    ("chat", {"temperature": -1}, "temperature"),
    ("completion", {"temperature": 3}, "temperature"),
    ("chat", {"temperature": "1"}, "temperature"),
    ("chat", {"temperature": math.nan}, "temperature"),
    ("chat", {"temperature": math.inf}, "temperature"),
    ("chat", {"temperature": False}, "temperature"),
    ("chat", {"top_p": 0}, "top_p"),
    ("completion", {"top_p": 1.5}, "top_p"),
    ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completion", {"frequency_penalty": -3}, "frequency_penalty"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {"stop": ["a", ""]}, "stop"),
    ("completion", {"stop": 7}, "stop"),
    ("completion", {"stop": ""}, "stop"),
    ("completion", {"logprobs": 6}, "logprobs"),
    ("completion", {"logprobs": True}, "logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("completion", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("chat", {"parallel_tool_calls": False}, "parallel_tool_calls"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("chat", {"stream": True, "stream_options": [1]}, "stream_options"),
    ("completion", {"stream": "true"}, "stream"),
    ("completion", {"echo": True}, "echo"),
    ("completion", {"best_of": 2}, "best_of"),
    ("completion", {"suffix": "end"}, "suffix"),
    ("chat", {"seed": "x"}, "seed"),
    ("completion", {"seed": 2**64}, "seed"),
    ("completion", {"prompt": []}, "prompt"),
    ("completion", {"prompt": [[]]}, "prompt[0]"),
    ("completion", {"prompt": [5, -1]}, "prompt"),
    ("completion", {"prompt": [5, 1000]}, "prompt"),
    ("completion", {"prompt": [1, True]}, "prompt"),
    ("completion", {"prompt": ["a", 1]}, "prompt"),
    ("completion", {"prompt": [[1], 2]}, "prompt"),
    ("completion", {"prompt": ""}, "prompt"),
    ("completion", {"prompt": ["a"] * 9}, "prompt"),
    ("completion", {"prompt": {"text": "x"}}, "prompt"),
    ("chat", {"top_k": -2}, "top_k"),
    ("chat", {"ignore_eos": 1}, "ignore_eos"),
    ("chat", {"user": 12}, "user"),
    ("chat", {"repetition_penalty": 1.2}, "repetition_penalty"),
    ("chat", {"guided_json": {"type": "object"}}, "guided_json"),
]


@pytest.mark.parametrize("kind,changes,param", BAD, ids=[f"{k}-{p}-{i}" for i, (k, _, p) in enumerate(BAD)])
def test_bad_body_is_a_400_naming_the_field(kind, changes, param):
    with pytest.raises(InvalidParam) as info:
        PARSE[kind](body_with(kind, **changes), limits=LIMITS)
    exc = info.value
    assert isinstance(exc, ApiError) and exc.status == 400
    assert exc.param == param, exc.message
    assert exc.message and len(exc.message) < 300
    err = error_json(exc)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] == exc.code


def test_the_bad_table_is_large_enough():
    assert len(BAD) >= 35


@pytest.mark.parametrize("body", [None, [], "x", 3, [CHAT]])
def test_a_body_that_is_not_an_object_is_a_400(body):
    for parse in PARSE.values():
        with pytest.raises(InvalidParam) as info:
            parse(body, limits=LIMITS)
        assert info.value.status == 400 and info.value.param is None


def test_refused_fields_say_what_polyhead_does_not_support():
    with pytest.raises(InvalidParam) as info:
        parse_chat(body_with("chat", tools=[{"type": "function"}]), limits=LIMITS)
    assert "tools" in info.value.message and "not supported" in info.value.message
    with pytest.raises(InvalidParam) as info:
        parse_chat(body_with("chat", messages=[user([{"type": "input_audio", "input_audio": {}}])]), limits=LIMITS)
    assert "input_audio" in info.value.message and info.value.code == "unsupported_value"


def test_a_minimal_completion_body_takes_openai_defaults():
    call = parse_completion(COMPLETION, limits=LIMITS)
    assert call == GenCall(model="m", kind="completion", prompts=["Hello"], n=1, max_tokens=None,
                           sampling=SamplingParams(temperature=1.0), stream=False, include_usage=False, user=None)


def test_a_full_completion_body_normalizes():
    body = {"model": "support-v2", "prompt": ["a", "b"], "max_tokens": 32, "temperature": 0, "top_p": 0.9, "n": 2,
            "stop": "\n", "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": 3,
            "user": "u1", "stream": True, "stream_options": {"include_usage": True}, "echo": False, "suffix": None,
            "best_of": 2, "top_k": 40, "ignore_eos": True, "logit_bias": {}, "some_future_field": {"x": 1}}
    call = parse_completion(body, limits=LIMITS)
    assert (call.model, call.kind, call.prompts, call.n, call.max_tokens) == ("support-v2", "completion",
                                                                               ["a", "b"], 2, 32)
    assert (call.stream, call.include_usage, call.user, call.echo) == (True, True, "u1", False)
    assert call.sampling == SamplingParams(temperature=0.0, top_p=0.9, top_k=40, presence_penalty=0.5,
                                           frequency_penalty=-0.5, seed=7, stop=("\n",), ignore_eos=True, logprobs=3)
    assert call.sampling.validated(1000) == call.sampling  # what the engine accepts as it is


@pytest.mark.parametrize("prompt,prompts", [
    ("x", ["x"]), (["x", "y"], ["x", "y"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
    ([0, 999], [[0, 999]])])
def test_every_prompt_shape_normalizes(prompt, prompts):
    assert parse_completion(body_with("completion", prompt=prompt), limits=LIMITS).prompts == prompts


def test_chat_normalizes_messages_and_prefers_max_completion_tokens():
    body = {"model": "m", "max_tokens": 10, "max_completion_tokens": 20, "stop": ["a", "b"], "seed": -1,
            "logprobs": True, "top_logprobs": 5, "top_k": -1, "response_format": {"type": "text"},
            "tool_choice": "none", "modalities": ["text"], "stream": False, "stream_options": None,
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                      {"type": "text", "text": "there"}], "name": "ann"},
                         {"role": "assistant", "content": "Hi.", "tool_calls": []},
                         {"role": "user", "content": "Bye?"}]}
    call = parse_chat(body, limits=LIMITS)
    assert call.kind == "chat" and call.max_tokens == 20 and call.n == 1
    assert call.prompts == [[{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hello\nthere", "name": "ann"},
                             {"role": "assistant", "content": "Hi."},
                             {"role": "user", "content": "Bye?"}]]
    assert call.sampling.stop == ("a", "b") and call.sampling.logprobs == 5 and call.sampling.top_k == 0
    assert call.sampling.seed == 2**63 - 1  # OpenAI's int64 seed folded into the engine's range
    assert parse_chat(body_with("chat", max_tokens=10), limits=LIMITS).max_tokens == 10
    assert parse_chat(body_with("chat", logprobs=True), limits=LIMITS).sampling.logprobs == 0
    assert parse_chat(CHAT, limits=LIMITS).sampling.logprobs is None


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 2, 5, 21, 2048, 2049, 10**30, -2**63, rng.randint(-10, 3000)])
    if kind == "float":
        return rng.choice([0.0, 0.5, 1.0, 2.0, -0.1, 1e308, math.nan, math.inf, -math.inf, rng.uniform(-3, 3)])
    if kind == "str":
        return rng.choice(["", "x", "text", "user", "assistant", "system", "image_url", "none", "\ud800", "é" * 300])
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = ["type", "text", "role", "content", "include_usage", "name", "tool_calls", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
          "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "user", "stream",
          "stream_options", "echo", "suffix", "best_of", "top_k", "ignore_eos", "tools", "response_format",
          "logit_bias", "modalities", "min_p"]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_any_json_value_in_any_field_is_a_call_or_a_400(kind):
    rng = random.Random(1234 if kind == "chat" else 4321)
    outcomes = {"ok": 0, "400": 0}
    for i in range(3000):
        body = body_with(kind) if i % 2 else {}
        for name in rng.sample(FIELDS, rng.randint(1, 4)):
            body[name] = _random_json(rng)
        if kind == "chat" and rng.random() < 0.5:
            body["messages"] = [{"role": rng.choice(["user", "system", "x", 1]), "content": _random_json(rng)}]
        try:
            call = PARSE[kind](body, limits=LIMITS)
        except InvalidParam as exc:
            assert exc.status == 400 and isinstance(exc.message, str)
            outcomes["400"] += 1
        else:
            assert isinstance(call, GenCall) and call.kind == kind and 1 <= call.n <= LIMITS.max_n
            assert call.sampling.validated(LIMITS.vocab_size) == call.sampling
            outcomes["ok"] += 1
    assert outcomes["ok"] > 50 and outcomes["400"] > 500, outcomes


# ---- responses and streams, checked against the openai package's own types ----------------------------------

def _round_trips(model_type, obj: dict) -> None:
    parsed = model_type.model_validate(obj)
    assert parsed.model_dump(mode="json", exclude_unset=True) == json.loads(json.dumps(obj))


def test_completion_response_is_an_openai_completion():
    lps = completion_logprobs(["Hel", "lo"], [-0.1, -float("inf")], [[("Hel", -0.1), ("He", -2.5)], [("x", -1.0)]],
                              offset=0)
    obj = completion_response("m", [completion_choice(0, "Hello", "stop", lps),
                                    completion_choice(1, "Hi", "length")], usage(5, 3), id="cmpl-1", created=10)
    _round_trips(Completion, obj)
    c = Completion.model_validate(obj)
    assert c.object == "text_completion" and c.usage == CompletionUsage(prompt_tokens=5, completion_tokens=3,
                                                                        total_tokens=8)
    assert c.choices[0].logprobs.text_offset == [0, 3] and c.choices[0].logprobs.token_logprobs == [-0.1, -9999.0]
    assert c.choices[0].logprobs.top_logprobs == [{"Hel": -0.1, "He": -2.5}, {"x": -1.0, "lo": -9999.0}]
    assert completion_response("m", [], usage(1, 0))["id"].startswith("cmpl-")


def test_completion_logprobs_zero_holds_the_chosen_token():
    lps = completion_logprobs(["a", "bc"], [-1.0, -2.0], None, offset=7)
    assert lps == {"tokens": ["a", "bc"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{"a": -1.0},
                                                                                               {"bc": -2.0}],
                   "text_offset": [7, 8]}


def test_chat_response_is_an_openai_chat_completion():
    lps = chat_logprobs(["Pa", "ris", "é"], [-0.5, -0.25, -1.0], [[("Pa", -0.5), ("Lo", -1.5)], [("ris", -0.25)],
                                                                   [("é", -1.0)]])
    obj = chat_response("m", [chat_choice(0, "Paris", "stop", lps), chat_choice(1, "Lon", "length")], usage(9, 3))
    _round_trips(ChatCompletion, obj)
    c = ChatCompletion.model_validate(obj)
    assert c.id.startswith("chatcmpl-") and c.object == "chat.completion" and isinstance(c.created, int)
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content == "Paris"
    assert c.choices[0].logprobs.content[2].bytes == [0xC3, 0xA9]
    assert [t.token for t in c.choices[0].logprobs.content[0].top_logprobs] == ["Pa", "Lo"]
    assert c.usage.total_tokens == 12


def test_a_chat_stream_is_openai_chunks_and_usage():
    cid, created = new_id("chat"), 123
    events = [chat_chunk(cid, "m", created, 0, role=True, include_usage=True)]
    events += [chat_chunk(cid, "m", created, 0, content=p, include_usage=True,
                          logprobs=chat_logprobs([p], [-0.5])) for p in ["Par", "is"]]
    events.append(chat_chunk(cid, "m", created, 0, finish_reason="stop", include_usage=True))
    events.append(usage_chunk("chat", cid, "m", created, usage(4, 2)))
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    for e in events:
        _round_trips(ChatCompletionChunk, e)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Paris"
    assert events[3]["choices"][0]["delta"] == {} and chunks[3].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert all(c.id == cid and c.object == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chat_chunk(cid, "m", created, 0, content="x")


def test_a_completion_stream_is_openai_completions():
    cid = new_id("completion")
    events = [completion_chunk(cid, "m", 5, 0, "Hel", logprobs=completion_logprobs(["Hel"], [-0.3])),
              completion_chunk(cid, "m", 5, 0, "lo", "length"),
              usage_chunk("completion", cid, "m", 5, usage(2, 2))]
    for e in events[1:]:
        _round_trips(Completion, e)
    # A piece before the last has finish_reason null, as OpenAI's and vLLM's streams send it; the SDK's Completion
    # (typed for the whole response) requires one, so that piece is checked with the last piece's reason.
    assert events[0]["choices"][0]["finish_reason"] is None
    _round_trips(Completion, {**events[0], "choices": [{**events[0]["choices"][0], "finish_reason": "length"}]})
    assert events[-1]["choices"] == [] and Completion.model_validate(events[-1]).usage.total_tokens == 4


def test_builders_refuse_a_finish_reason_openai_has_not():
    with pytest.raises(ValueError):
        completion_choice(0, "x", "abort")


def test_sse_frames():
    frame = sse({"a": "é", "b": [1]})
    assert frame == 'data: {"a":"é","b":[1]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    err = sse_error("engine failed", "server_error", "internal_error")
    assert err.startswith(b"data: ") and err.endswith(b"\n\n")
    assert json.loads(err[6:]) == {"error": {"message": "engine failed", "type": "server_error",
                                             "code": "internal_error", "param": None}}


# ---- render_chat -------------------------------------------------------------------------------------------------

class _NoTemplate:
    chat_template = None


def test_render_chat_without_a_template_is_a_clear_400():
    with pytest.raises(InvalidParam) as info:
        render_chat(_NoTemplate(), [{"role": "user", "content": "hi"}])
    assert info.value.status == 400 and "chat template" in info.value.message


@pytest.mark.slow
def test_render_chat_is_the_bases_template_on_joined_text(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    body = {"model": "m", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Capital of France?"},
                                     {"type": "text", "text": "One word."}]}]}
    messages = parse_chat(body, limits=LIMITS).prompts[0]
    expected = tok.apply_chat_template([{"role": "system", "content": "You are terse."},
                                        {"role": "user", "content": "Capital of France?\nOne word."}],
                                       tokenize=False, add_generation_prompt=True)
    assert render_chat(tok, messages) == expected
    assert render_chat(tok, body["messages"]) == expected  # raw parts are joined the same way
    assert expected.endswith("<|im_start|>assistant\n")


class _EchoTemplate:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        if messages[-1]["role"] == "assistant":
            import jinja2
            raise jinja2.TemplateError("the last message must be the user's")
        return repr(messages)


def test_render_chat_normalizes_raw_messages_and_reports_template_refusals():
    raw = [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
           {"role": "user", "content": "q"}]
    assert render_chat(_EchoTemplate(), raw) == repr([{"role": "system", "content": "a\nb"},
                                                      {"role": "user", "content": "q"}])
    with pytest.raises(InvalidParam) as info:
        render_chat(_EchoTemplate(), [{"role": "assistant", "content": "x"}])
    assert info.value.status == 400 and "last message" in info.value.message
    with pytest.raises(InvalidParam) as info:
        render_chat(_EchoTemplate(), [{"role": "user", "content": [{"type": "image_url"}]}])
    assert info.value.param == "messages[0].content[0].type"
