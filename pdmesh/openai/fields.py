"""Every request field of the OpenAI API and vLLM's extensions, and what this server does with it.

A field is *supported* (it does what OpenAI/vLLM document), has *no effect* on the output
(accepted: bookkeeping fields such as ``user``), or is *refused*: a request that sets it to a value
that would change the output in a way this server does not implement gets a 400 naming it (values
that change nothing, e.g. ``best_of: 1``, pass).  Fields in no table are ignored with a warning in
the gateway's log, as vLLM does.  ``markdown_table()`` renders this table for the README (a test
checks that the README shows it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from pdmesh.openai.errors import not_supported

Kind = Literal["chat", "completion"]
Status = Literal["supported", "no effect", "refused"]


def _unset(v: Any) -> bool:
    return v is None


def _falsy(v: Any) -> bool:
    return v is None or v is False or v == "" or v == [] or v == {}


@dataclass(frozen=True)
class Field:
    name: str
    kinds: tuple[Kind, ...]
    origin: Literal["OpenAI", "vLLM"]
    status: Status
    note: str = ""
    allowed: Callable[[Any], bool] = _unset
    """Refused fields: values accepted because they change nothing (default: only absent/null)."""
    hint: str = ""
    """Refused fields: what to do instead (in the 400's message)."""


BOTH: tuple[Kind, ...] = ("chat", "completion")
CHAT: tuple[Kind, ...] = ("chat",)
COMP: tuple[Kind, ...] = ("completion",)

FIELDS: tuple[Field, ...] = (
    Field("model", BOTH, "OpenAI", "supported", "must be the served model name (404 otherwise); may be omitted"),
    Field("messages", CHAT, "OpenAI", "supported", "roles system, developer, user, assistant (with tool_calls), tool; "
          "text content or text parts (image, audio and file parts: 400)"),
    Field("prompt", COMP, "OpenAI", "supported", "text, token ids, or a list of either"),
    Field("max_tokens", BOTH, "OpenAI", "supported", "default: the rest of the context (chat), 16 (completions), "
          "or generation_config.json's max_new_tokens"),
    Field("max_completion_tokens", CHAT, "OpenAI", "supported"),
    Field("temperature", BOTH, "OpenAI", "supported", "[0, 2]"),
    Field("top_p", BOTH, "OpenAI", "supported", "(0, 1]"),
    Field("n", BOTH, "OpenAI", "supported", "up to --max-n"),
    Field("stop", BOTH, "OpenAI", "supported", "up to --max-stop strings"),
    Field("seed", BOTH, "OpenAI", "supported", "same seed, same tokens, disaggregated or not"),
    Field("presence_penalty", BOTH, "OpenAI", "supported"),
    Field("frequency_penalty", BOTH, "OpenAI", "supported"),
    Field("logit_bias", BOTH, "OpenAI", "supported", "token id -> bias in [-100, 100]"),
    Field("logprobs", BOTH, "OpenAI", "supported", "chat: boolean; completions: 0-20 alternatives"),
    Field("top_logprobs", CHAT, "OpenAI", "supported", "0-20"),
    Field("stream", BOTH, "OpenAI", "supported", "server-sent events"),
    Field("stream_options", BOTH, "OpenAI", "supported", "include_usage, continuous_usage_stats (vLLM)"),
    Field("response_format", BOTH, "OpenAI", "supported", "text, json_object, json_schema (always enforced)"),
    Field("tools", CHAT, "OpenAI", "supported", "type function; rendered by the chat template"),
    Field("tool_choice", CHAT, "OpenAI", "supported", "none, auto (--enable-auto-tool-choice), required, a named "
          "function; required and named are enforced by constrained decoding"),
    Field("parallel_tool_calls", CHAT, "OpenAI", "supported", "false: at most one call"),
    Field("echo", BOTH, "OpenAI", "supported", "completions: the prompt leads the text (and its logprobs with "
          "'logprobs'); chat (vLLM): a final assistant message leads the reply"),
    Field("user", BOTH, "OpenAI", "no effect"),
    Field("metadata", CHAT, "OpenAI", "no effect"),
    Field("prompt_cache_key", CHAT, "OpenAI", "no effect", "prefix caching is automatic"),
    Field("safety_identifier", CHAT, "OpenAI", "no effect"),
    Field("service_tier", CHAT, "OpenAI", "refused", "except auto and default",
          lambda v: v in (None, "auto", "default")),
    Field("store", CHAT, "OpenAI", "refused", "except false", _falsy, "nothing is stored"),
    Field("suffix", COMP, "OpenAI", "refused", "except empty", _falsy, "insertion is not implemented"),
    Field("best_of", COMP, "OpenAI", "refused", "except 1 (or equal to n)", lambda v: v is None or v == 1,
          "use n and pick on the client"),
    Field("functions", CHAT, "OpenAI", "refused", "deprecated", _unset, "use 'tools'"),
    Field("function_call", CHAT, "OpenAI", "refused", "deprecated", _unset, "use 'tool_choice'"),
    Field("audio", CHAT, "OpenAI", "refused", "", _unset, "text only"),
    Field("modalities", CHAT, "OpenAI", "refused", "except [\"text\"]", lambda v: v is None or v == ["text"], "text only"),
    Field("prediction", CHAT, "OpenAI", "refused", "", _unset, "speculative predicted outputs are not implemented"),
    Field("web_search_options", CHAT, "OpenAI", "refused", "", _unset, "no web search"),
    Field("reasoning_effort", CHAT, "OpenAI", "refused", "", _unset,
          "use chat_template_kwargs, e.g. {\"enable_thinking\": false}"),
    Field("verbosity", CHAT, "OpenAI", "refused"),
    Field("top_k", BOTH, "vLLM", "supported", "0 or -1: off"),
    Field("min_p", BOTH, "vLLM", "supported"),
    Field("repetition_penalty", BOTH, "vLLM", "supported"),
    Field("min_tokens", BOTH, "vLLM", "supported", "not with a grammar (it decides the end)"),
    Field("stop_token_ids", BOTH, "vLLM", "supported"),
    Field("include_stop_str_in_output", BOTH, "vLLM", "supported"),
    Field("ignore_eos", BOTH, "vLLM", "supported", "not with a grammar"),
    Field("skip_special_tokens", BOTH, "vLLM", "supported"),
    Field("prompt_logprobs", BOTH, "vLLM", "supported", "0-20; not with stream; such prompts skip the prefix cache"),
    Field("add_generation_prompt", CHAT, "vLLM", "supported"),
    Field("continue_final_message", CHAT, "vLLM", "supported"),
    Field("add_special_tokens", BOTH, "vLLM", "supported"),
    Field("chat_template_kwargs", CHAT, "vLLM", "supported", "e.g. enable_thinking"),
    Field("guided_json", BOTH, "vLLM", "supported"),
    Field("guided_regex", BOTH, "vLLM", "supported"),
    Field("guided_choice", BOTH, "vLLM", "supported"),
    Field("guided_grammar", BOTH, "vLLM", "supported", "EBNF (xgrammar/GBNF)"),
    Field("structured_outputs", BOTH, "vLLM", "supported", "json, regex, choice, grammar, json_object"),
    Field("guided_decoding_backend", BOTH, "vLLM", "refused", "except xgrammar and auto",
          lambda v: v in (None, "xgrammar", "auto"), "xgrammar is the only backend"),
    Field("structural_tag", BOTH, "vLLM", "refused"),
    Field("guided_whitespace_pattern", BOTH, "vLLM", "refused", "", _unset, "JSON is generated without free whitespace"),
    Field("use_beam_search", BOTH, "vLLM", "refused", "except false", _falsy),
    Field("length_penalty", BOTH, "vLLM", "refused", "except 1", lambda v: v is None or v == 1),
    Field("truncate_prompt_tokens", BOTH, "vLLM", "refused"),
    Field("allowed_token_ids", BOTH, "vLLM", "refused", "", _unset, "use logit_bias or a grammar"),
    Field("bad_words", BOTH, "vLLM", "refused", "except empty", _falsy, "use logit_bias"),
    Field("spaces_between_special_tokens", BOTH, "vLLM", "refused", "except true", lambda v: v is None or v is True),
    Field("documents", CHAT, "vLLM", "refused"),
    Field("chat_template", CHAT, "vLLM", "refused", "", _unset, "the server's --chat-template applies"),
    Field("mm_processor_kwargs", BOTH, "vLLM", "refused", "", _unset, "text only"),
    Field("priority", BOTH, "vLLM", "refused", "except 0", lambda v: v is None or v == 0),
    Field("logits_processors", BOTH, "vLLM", "refused"),
    Field("return_tokens_as_token_ids", BOTH, "vLLM", "refused", "except false", _falsy),
    Field("return_token_ids", BOTH, "vLLM", "refused", "except false", _falsy),
    Field("cache_salt", BOTH, "vLLM", "refused"),
    Field("kv_transfer_params", BOTH, "vLLM", "refused"),
    Field("vllm_xargs", BOTH, "vLLM", "refused"),
    Field("request_id", BOTH, "vLLM", "refused", "", _unset, "the server names requests (X-Request-Id)"),
)

_BY_KIND: dict[Kind, dict[str, Field]] = {k: {f.name: f for f in FIELDS if k in f.kinds} for k in BOTH}


def check_fields(body: dict[str, Any], kind: Kind) -> list[str]:
    """Refuse fields this server does not implement (400 naming the first); return the names of
    fields it does not know (to be logged as ignored)."""
    known = _BY_KIND[kind]
    unknown = []
    for key, value in body.items():
        f = known.get(key)
        if f is None:
            unknown.append(key)
        elif f.status == "refused" and not f.allowed(value):
            if f.name == "best_of" and value == body.get("n"):
                continue
            raise not_supported(key, f.hint or f.note)
    return unknown


def field_status(name: str, kind: Kind) -> Optional[Status]:
    f = _BY_KIND[kind].get(name)
    return f.status if f is not None else None


def markdown_table() -> str:
    """The README's table of request fields."""
    rows = ["| field | endpoints | from | status | notes |", "| --- | --- | --- | --- | --- |"]
    where = {BOTH: "chat, completions", CHAT: "chat", COMP: "completions"}
    for f in FIELDS:
        note = f"{f.note} ({f.hint})" if f.note and f.hint else f.note or f.hint
        rows.append(f"| `{f.name}` | {where[f.kinds]} | {f.origin} | {f.status} | {note} |")
    return "\n".join(rows)
