"""Chat `messages` are encoded by mistral-common's instruct tokenizers: our ids equal mistral-common's
own encoding and, independently, the template written out by hand with sentencepiece
(`<s>[INST] a [/INST] b</s>[INST] c [/INST]`, the system prompt folded into a user turn)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import train_tokenizer
from pp_runtime.errors import CheckpointError, ConfigError, InputError
from pp_runtime.inference.requests import make_request, parse_prompt_line
from pp_runtime.inference.sampling import SamplingParams
from pp_runtime.io.tokenizer import Tokenizer, find_mistral_v1_tokenizer

SYSTEM, A, B, C, D, E = "seven red boxes", "the cat sat", "two dogs ran", "one blue kite", "green hills", "small fish"

CONVERSATIONS = {
    "system, user, assistant, user": [("system", SYSTEM), ("user", A), ("assistant", B), ("user", C)],
    "user": [("user", A)],
    "system, user": [("system", SYSTEM), ("user", A)],
    "system, three user turns": [("system", SYSTEM), ("user", A), ("assistant", B), ("user", C), ("assistant", D),
                                 ("user", E)],
    "two system messages": [("system", SYSTEM), ("system", D), ("user", A)],
}
_KIND = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def line_of(conv) -> str:
    return json.dumps({"id": "c", "messages": [{"role": r, "content": c} for r, c in conv]})


def ours(tok: Tokenizer, conv) -> list[int]:
    return make_request(0, parse_prompt_line(line_of(conv), 1), tok, 8, SamplingParams()).prompt_tokens


def reference(path: Path, conv) -> list[int]:
    """mistral-common's own, loaded its own way: the version comes from the file name."""
    request = ChatCompletionRequest(messages=[_KIND[r](content=c) for r, c in conv])
    return MistralTokenizer.from_file(str(path)).encode_chat_completion(request).tokens


def by_hand(sp: spm.SentencePieceProcessor, conv, version: str) -> list[int]:
    """The template written out: v1 spells [INST] as text and folds the system prompt into the first
    user turn; v3 uses the [INST]/[/INST] control tokens and folds it into the last user turn; every
    assistant turn ends with EOS."""
    system = "\n\n".join(c for r, c in conv if r == "system")
    users = [i for i, (r, _) in enumerate(conv) if r == "user"]
    fold_into = users[0] if version == "v1" else users[-1]
    ids = [sp.bos_id()]
    for i, (role, content) in enumerate(conv):
        if role == "user":
            text = f"{system}\n\n{content}" if system and i == fold_into else content
            if version == "v1":
                ids += sp.encode(f"[INST] {text} [/INST]")
            else:
                ids += [sp.piece_to_id("[INST]"), *sp.encode(text), sp.piece_to_id("[/INST]")]
        elif role == "assistant":
            ids += sp.encode(content) + [sp.eos_id()]
    return ids


@pytest.fixture(scope="module")
def v1_tokenizer(tmp_path_factory) -> Path:
    """The small test tokenizer, with [INST] and [/INST] as text pieces (in Mistral's v1 they are text too)."""
    return train_tokenizer(tmp_path_factory.mktemp("chat_v1"), user_defined_symbols=("[INST]", "[/INST]"))


@pytest.fixture(scope="module")
def v3_tokenizer(tmp_path_factory) -> Path:
    """The small test tokenizer with [INST]=3 and [/INST]=4 as control tokens (Mistral's v3 layout);
    named tokenizer.model.v3 so that mistral-common's own loader reads it as v3."""
    return train_tokenizer(tmp_path_factory.mktemp("chat_v3"), name="tokenizer.model.v3",
                           control_symbols=("[INST]", "[/INST]"))


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_v1_conversations_match_mistral_common_and_the_template(v1_tokenizer, name):
    conv = CONVERSATIONS[name]
    tok = Tokenizer(v1_tokenizer)
    assert tok.chat_version == "v1"
    got = ours(tok, conv)
    assert got == reference(v1_tokenizer, conv)
    assert got == by_hand(spm.SentencePieceProcessor(model_file=str(v1_tokenizer)), conv, "v1")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_v3_conversations_match_mistral_common_and_the_template(v3_tokenizer, name):
    conv = CONVERSATIONS[name]
    tok = Tokenizer(v3_tokenizer)
    assert tok.chat_version == "v3"
    got = ours(tok, conv)
    assert got == reference(v3_tokenizer, conv)
    sp = spm.SentencePieceProcessor(model_file=str(v3_tokenizer))
    assert got == by_hand(sp, conv, "v3")
    assert sp.piece_to_id("[INST]") == 3 and sp.piece_to_id("[/INST]") == 4


def test_the_template_is_the_documented_one(v1_tokenizer, v3_tokenizer):
    """What the issue wrote down: `<s>[INST] a [/INST] b</s>[INST] c [/INST]`, the system prompt in a
    user turn; the echoed prompt shows it."""
    conv = [("user", A), ("assistant", B), ("user", C)]
    rec = parse_prompt_line(line_of(conv), 1)
    v1 = make_request(0, rec, Tokenizer(v1_tokenizer), 8, SamplingParams())
    assert v1.prompt == f"<s> [INST] {A} [/INST] {B}</s> [INST] {C} [/INST]"
    v3 = make_request(0, rec, Tokenizer(v3_tokenizer), 8, SamplingParams())
    assert v3.prompt == f"<s>[INST] {A}[/INST] {B}</s>[INST] {C}[/INST]"
    with_system = make_request(0, parse_prompt_line(line_of([("system", SYSTEM), *conv]), 1),
                               Tokenizer(v3_tokenizer), 8, SamplingParams())
    assert with_system.prompt.count("[INST]") == 2 and f"[INST] {SYSTEM}" in with_system.prompt


def test_mistral_tokenizers_pick_their_version_and_match_mistral_common():
    """The real tokenizers shipped inside mistral-common: 32000 pieces (Mistral 7B v0.1, Mixtral 8x7B)
    are v1, 32768 pieces (Mistral 7B v0.3) are v3."""
    v1_path = find_mistral_v1_tokenizer()
    v3_path = v1_path.parent / "mistral_instruct_tokenizer_240323.model.v3"
    conv = CONVERSATIONS["system, user, assistant, user"]
    request = ChatCompletionRequest(messages=[_KIND[r](content=c) for r, c in conv])
    for path, version, mistral in ((v1_path, "v1", MistralTokenizer.v1()), (v3_path, "v3", MistralTokenizer.v3())):
        tok = Tokenizer(path)
        assert (tok.vocab_size, tok.chat_version) == ({"v1": 32000, "v3": 32768}[version], version)
        assert ours(tok, conv) == mistral.encode_chat_completion(request).tokens
        assert ours(tok, conv) == by_hand(spm.SentencePieceProcessor(model_file=str(path)), conv, version)
    # the setting overrides the vocabulary's choice (a v1 template on a v3 vocabulary), but never claims
    # control tokens a vocabulary lacks
    assert Tokenizer(v3_path, chat="v1").chat_version == "v1"
    with pytest.raises(CheckpointError, match=r"model.chat=v3, but .* has no \[INST\]"):
        Tokenizer(v1_path, chat="v3")


def test_plain_prompts_stay_sentencepiece(v3_tokenizer):
    tok = Tokenizer(v3_tokenizer)
    req = make_request(0, parse_prompt_line(json.dumps({"id": 1, "prompt": A}), 1), tok, 8, SamplingParams())
    assert req.prompt == A and req.prompt_tokens == tok.encode(A, bos=True)


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "bot", "content": A}], "message 1 has role 'bot'; use system, user or assistant"),
    ([{"role": "tool", "content": A}], "message 1 has role 'tool'"),
    ([{"role": "user", "content": A}, {"role": "assistant", "content": B}],
     "the last message is from the assistant; a conversation must end with a user message"),
    ([{"role": "system", "content": SYSTEM}], "the last message is from the system"),
    ([{"role": "user", "content": "  "}], "message 1 (user) has empty content"),
    ([{"role": "user", "content": A}, {"role": "assistant", "content": ""}, {"role": "user", "content": C}],
     "message 2 (assistant) has empty content"),
    ([{"role": "user"}], "message 1 needs a \"role\" and a \"content\" string"),
    ([], "\"messages\" must be a non-empty list"),
    ("hello", "\"messages\" must be a non-empty list"),
    ([{"role": "user", "content": A}, {"role": "assistant", "content": B}, {"role": "system", "content": SYSTEM},
      {"role": "user", "content": C}], "mistral-common rejects the conversation (Unexpected role 'system' after role "
                                       "'assistant')"),
])
def test_bad_conversations_are_one_line_input_errors(v1_tokenizer, messages, expected):
    line = json.dumps({"id": "x", "messages": messages})
    with pytest.raises(InputError) as e:
        make_request(0, parse_prompt_line(line, 7, source="chats.jsonl"), Tokenizer(v1_tokenizer), 8, SamplingParams())
    assert str(e.value).startswith("chats.jsonl line 7 (id 'x'): ") and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_chat_setting_is_a_config_error(v1_tokenizer):
    with pytest.raises(ConfigError, match="model.chat='v2': use auto, v1 or v3"):
        Tokenizer(v1_tokenizer, chat="v2")


def test_infer_writes_chat_lines_as_valid_json(tiny_ckpt, tmp_path):
    """End to end through launch/infer.py's job: a chat line and a plain line; the chat's `prompt` is
    its encoded conversation as text and its token count is mistral-common's."""
    from pp_runtime.jobs.config import load_config
    from pp_runtime.jobs.infer import run

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    conv = [("system", SYSTEM), ("user", A), ("assistant", B), ("user", C)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(line_of(conv) + "\n" + json.dumps({"id": "p", "prompt": A}) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(load_config("infer", [f"model.path={ckpt}", f"input={inp}", f"output={out}", "max_new_tokens=3",
                                         "device=cpu", "progress=false"])) == 0
    finally:
        torch.set_num_threads(threads)
    chat, plain = [json.loads(line) for line in out.read_text().splitlines()]
    assert chat["id"] == "c" and chat["prompt"].startswith("<s>") and chat["prompt"].count("</s>") == 1
    assert chat["prompt_tokens"] == len(reference(ckpt / "tokenizer.model", conv))
    assert 1 <= chat["generated_tokens"] <= 3 and isinstance(chat["completion"], str)
    assert plain["prompt"] == A
