"""Prompt records from the command line or JSONL, and their conversion into requests."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from pp_runtime.errors import InputError, PPRuntimeError
from pp_runtime.inference.batching import Request
from pp_runtime.inference.sampling import SamplingParams
from pp_runtime.io.chat import parse_messages
from pp_runtime.io.jsonl import check_utf8


@dataclass(frozen=True)
class PromptRecord:
    line_no: int  # 1-based line in the input file (0 for a command-line prompt)
    id: Any
    prompt: Optional[str]  # plain text, encoded by sentencepiece with BOS; None for a chat:
    messages: Optional[tuple[tuple[str, str], ...]] = None  # a chat: (role, content), encoded by mistral-common
    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    where: str = ""  # "FILE line N (id X)" for messages; empty for a command-line prompt


def parse_prompt_line(line: str, line_no: int, source: str = "input") -> PromptRecord:
    """`{"id", "prompt", [max_new_tokens, temperature, top_p, top_k]}` or an OpenAI batch line
    (`custom_id`, `body` with `prompt` or `messages`, `max_tokens`, `temperature`, `top_p`)."""
    where = f"{source} line {line_no}"
    check_utf8(line, where)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    body = obj.get("body") if isinstance(obj.get("body"), dict) else obj
    rid = obj.get("custom_id", obj.get("id", line_no))
    prompt, messages = body.get("prompt"), None
    if prompt is None and body.get("messages") is not None:
        messages = parse_messages(body["messages"], f"{where} (id {rid!r})")
    elif not isinstance(prompt, str):
        raise InputError(f"{where}: no \"prompt\" string (or \"messages\" list); every line needs one")
    elif not prompt.strip():
        raise InputError(f"{where}: the prompt is empty; give a non-empty prompt")
    where = f"{where} (id {rid!r})"
    return PromptRecord(
        line_no=line_no, id=rid, prompt=prompt, messages=messages,
        max_new_tokens=_opt(body, ("max_new_tokens", "max_tokens"), int, where),
        temperature=_opt(body, ("temperature",), float, where),
        top_p=_opt(body, ("top_p",), float, where),
        top_k=_opt(body, ("top_k",), int, where),
        where=where,
    )


def _opt(obj: dict, keys: tuple[str, ...], kind: type, where: str) -> Any:
    for k in keys:
        v = obj.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                kind is int and not (isinstance(v, int) or v.is_integer())):
            raise InputError(f"{where}: {k}={v!r} is not {'an integer' if kind is int else 'a finite number'}")
        return kind(v)
    return None


def make_request(uid: int, rec: PromptRecord, tokenizer, default_max_new: int, default_sampling: SamplingParams) -> Request:
    """Errors name the input line and id (or the request id of a command-line prompt). A chat is
    encoded by mistral-common (Tokenizer.encode_chat) and its `prompt` is the encoded conversation as
    text (`<s>[INST] a [/INST] b</s>[INST] c [/INST]`); a plain prompt is encoded by sentencepiece."""
    where = rec.where or f"request {rec.id!r}"
    if rec.messages is not None:
        tokens = tokenizer.encode_chat(rec.messages, where)
        prompt = tokenizer.text_of(tokens)
    else:
        tokens, prompt = tokenizer.encode(rec.prompt, bos=True), rec.prompt
    if len(tokens) <= (1 if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else 0):
        raise InputError(f"{where}: the prompt tokenises to nothing; give a non-empty prompt")
    try:
        sampling = SamplingParams(
            temperature=default_sampling.temperature if rec.temperature is None else rec.temperature,
            top_p=default_sampling.top_p if rec.top_p is None else rec.top_p,
            top_k=default_sampling.top_k if rec.top_k is None else rec.top_k,
            seed=default_sampling.seed,
        )
    except PPRuntimeError as e:
        raise InputError(f"{where}: {e}") from None
    return Request(uid=uid, id=rec.id, prompt=prompt, prompt_tokens=tokens,
                   max_new_tokens=default_max_new if rec.max_new_tokens is None else rec.max_new_tokens,
                   sampling=sampling)


@dataclass(frozen=True)
class TokenLimit:
    """Longest prompt + max_new_tokens a sequence may reach, and how to fit a longer one: a windowed
    ring covers the model's whole context (older tokens roll out); a ring without a window holds whole
    sequences, so its length is the setting to change."""

    tokens: int
    hint: str

    @classmethod
    def of(cls, args, capacity: int) -> "TokenLimit":
        if args.sliding_window is not None and capacity >= args.sliding_window:
            return cls(args.max_seq_len, "shorten the prompt or lower max_new_tokens")
        return cls(capacity, "shorten the prompt, lower max_new_tokens, or lengthen each sequence's KV ring: set "
                   "inference.cache_len, or leave it unset and raise inference.gpu_memory_fraction or use fewer "
                   "slots (inference.batch_size x inference.microbatches) or more pipeline stages")


def check_request(req: Request, limit: TokenLimit, where: str) -> None:
    """Reject a request the engine cannot serve, before it takes a cache slot."""
    n = len(req.prompt_tokens)
    if n == 0:
        raise InputError(f"{where}: the prompt tokenises to nothing; give a non-empty prompt")
    if req.max_new_tokens < 1:
        raise InputError(f"{where}: max_new_tokens={req.max_new_tokens} must be at least 1")
    if n + req.max_new_tokens > limit.tokens:
        raise InputError(
            f"{where}: prompt of {n} tokens + max_new_tokens {req.max_new_tokens} exceeds the "
            f"model's limit of {limit.tokens} tokens; {limit.hint}"
        )