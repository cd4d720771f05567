"""Sentencepiece tokenizer as Mistral uses it: BOS prepended to prompts, no EOS appended; chat
`messages` through mistral-common's instruct tokenizer over the same model file (pp_runtime.io.chat)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Sequence

from sentencepiece import SentencePieceProcessor

from pp_runtime.errors import CheckpointError
from pp_runtime.io.chat import ChatEncoder, chat_version

TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.model.v1")


class Tokenizer:
    """Thin wrapper so the rest of the runtime sees ids and BOS/EOS, not sentencepiece."""

    def __init__(self, model_path: str | Path, chat: Optional[str] = None) -> None:
        """`chat`: the mistral-common template version for `messages` (v1, v3, or auto/None: by the
        vocabulary, pp_runtime.io.chat.chat_version)."""
        model_path = Path(model_path)
        if not model_path.is_file():
            raise CheckpointError(
                f"tokenizer file {str(model_path)!r} does not exist; put Mistral's tokenizer.model next to the "
                "weights or set model.tokenizer=PATH"
            )
        self.path = model_path
        try:
            self._sp = SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{model_path} is not a sentencepiece tokenizer model ({str(e).strip()}); it is "
                                  "empty or damaged: copy Mistral's tokenizer.model again") from None
        self.chat_version = chat_version(self._sp, chat, model_path)
        self._chat: Optional[ChatEncoder] = None

    @classmethod
    def from_dir(cls, path: str | Path, chat: Optional[str] = None) -> "Tokenizer":
        """Find `tokenizer.model` (or `tokenizer.model.v1`) in a checkpoint folder."""
        path = Path(path)
        if path.is_file():
            return cls(path, chat)
        if not path.exists():
            raise CheckpointError(f"tokenizer path {str(path)!r} does not exist; give a tokenizer.model or its folder")
        for name in TOKENIZER_NAMES:
            if (path / name).is_file():
                return cls(path / name, chat)
        raise CheckpointError(
            f"no tokenizer in {str(path)!r}: expected one of {', '.join(TOKENIZER_NAMES)}; copy Mistral's "
            "tokenizer.model into the folder or set model.tokenizer=PATH"
        )

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; prompts get BOS (as Mistral's reference does) and no EOS."""
        ids: list[int] = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; BOS/EOS and other control tokens are dropped."""
        return self._sp.decode([int(i) for i in ids])

    def encode_chat(self, messages: Sequence[tuple[str, str]], where: str) -> list[int]:
        """Token ids of a checked conversation (pp_runtime.io.chat.parse_messages), BOS first, by
        mistral-common's instruct tokenizer of version `chat_version`."""
        if self._chat is None:
            self._chat = ChatEncoder(self.path, self.chat_version)
        return self._chat.encode(messages, where)

    def text_of(self, ids: Sequence[int]) -> str:
        """`ids` as the model reads them: control tokens by name (`<s>`, `</s>`, `[INST]` of v3), the
        runs between them as text, each run's leading space kept (`<s>[INST] a [/INST] b</s>`)."""
        parts: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                text = self._sp.decode(run)
                if self._sp.id_to_piece(run[0]).startswith("\u2581") and not text.startswith(" "):
                    text = " " + text
                parts.append(text)
                run.clear()

        for i in (int(i) for i in ids):
            if self._sp.is_control(i):
                flush()
                parts.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        flush()
        return "".join(parts)


def find_mistral_v1_tokenizer() -> Optional[Path]:
    """The v1 Mistral tokenizer shipped inside the installed mistral-common wheel, if any."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "tokenizer.model.v1"
        if candidate.is_file():
            return candidate
    return None
