"""Chat `messages` encoded as Mistral's instruct models were trained on, by Mistral's own library.

mistral-common's instruct tokenizers turn a conversation into token ids:
`<s>[INST] a [/INST] b</s>[INST] c [/INST]`, every assistant turn closed by EOS, a system prompt
folded into a user turn (v1: the first one, v3: the last one). Two template versions fit the
models this runtime serves:

- v1: the 32000-piece sentencepiece tokenizer of Mistral 7B v0.1/v0.2 and Mixtral 8x7B, where
  `[INST]` and `[/INST]` are plain text;
- v3: the 32768-piece tokenizer of Mistral 7B v0.3, where `[INST]` and `[/INST]` are control tokens.

mistral-common wraps any sentencepiece model file (its `SentencePieceTokenizer` takes the version as
an argument rather than from the file name), so the same `tokenizer.model` serves plain prompts
(pp_runtime.io.tokenizer) and chat. v3 reads `[INST]`/`[/INST]` by piece name, so a vocabulary without
those control pieces cannot use it (checked when the tokenizer loads).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from pp_runtime.errors import CheckpointError, ConfigError, InputError

CHAT_VERSIONS = ("auto", "v1", "v3")
ROLES = ("system", "user", "assistant")
_V3_CONTROL = ("[INST]", "[/INST]")


def chat_version(sp, setting: Optional[str], path) -> str:
    """The template version for a sentencepiece processor: `setting` when it is v1 or v3; for auto, v3
    exactly when `[INST]` and `[/INST]` are control pieces of the vocabulary (Mistral's 32768-piece v3
    tokenizer), else v1 (the 32000-piece tokenizer of Mistral 7B v0.1 and Mixtral 8x7B spells them as
    text)."""
    setting = "auto" if setting is None else str(setting)
    if setting not in CHAT_VERSIONS:
        raise ConfigError(f"model.chat={setting!r}: use auto, v1 or v3 (the mistral-common instruct tokenizer "
                          "version of the model's tokenizer)")
    has_control = all(_is_control(sp, piece) for piece in _V3_CONTROL)
    if setting == "v3" and not has_control:
        raise CheckpointError(f"model.chat=v3, but {path} has no [INST] and [/INST] control tokens (v3 tokenizers "
                              "have 32768 pieces); use model.chat=v1 or model.chat=auto")
    if setting != "auto":
        return setting
    return "v3" if has_control else "v1"


def _is_control(sp, piece: str) -> bool:
    i = sp.piece_to_id(piece)
    return i != sp.unk_id() and sp.is_control(i)


def parse_messages(messages: Any, where: str) -> tuple[tuple[str, str], ...]:
    """(role, content) pairs of an OpenAI-style `messages` list, or one InputError naming `where`:
    roles system, user and assistant, non-empty string contents, and a user message last (the model
    answers it)."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {i} needs a \"role\" and a \"content\" string")
        role = m.get("role")
        if role not in ROLES:
            raise InputError(f"{where}: message {i} has role {role!r}; use system, user or assistant")
        if not m["content"].strip():
            raise InputError(f"{where}: message {i} ({role}) has empty content")
        out.append((role, m["content"]))
    if out[-1][0] != "user":
        raise InputError(f"{where}: the last message is from the {out[-1][0]}; a conversation must end with a user "
                         "message, which the model answers")
    return tuple(out)


class ChatEncoder:
    """mistral-common's MistralTokenizer over a sentencepiece model file, at a given template version."""

    def __init__(self, model_path, version: str) -> None:
        from mistral_common.protocol.instruct.normalize import get_normalizer
        from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
        from mistral_common.tokens.tokenizers.base import TokenizerVersion
        from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV1, InstructTokenizerV3
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

        v = TokenizerVersion(version)
        instruct = {"v1": InstructTokenizerV1, "v3": InstructTokenizerV3}[version]
        self.version = version
        self.mistral = MistralTokenizer(instruct(SentencePieceTokenizer(str(model_path), tokenizer_version=v)),
                                        validator=get_validator(v, mode=ValidationMode.test),
                                        request_normalizer=get_normalizer(v))

    def encode(self, messages: Sequence[tuple[str, str]], where: str) -> list[int]:
        """Token ids of a conversation (BOS first), as mistral-common's `encode_chat_completion` gives them."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kind = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        request = ChatCompletionRequest(messages=[kind[role](content=content) for role, content in messages])
        try:
            return list(self.mistral.encode_chat_completion(request).tokens)
        except (MistralCommonException, ValueError, AssertionError) as e:  # its checks of the role order
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{where}: mistral-common rejects the conversation ({reason})") from None
