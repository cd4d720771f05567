"""Sentencepiece tokenizer as Mistral uses it: BOS prepended to prompts, no EOS appended."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Sequence

from sentencepiece import SentencePieceProcessor

from pp_runtime.errors import CheckpointError

TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.model.v1")


class Tokenizer:
    """Thin wrapper so the rest of the runtime sees ids and BOS/EOS, not sentencepiece."""

    def __init__(self, model_path: str | Path) -> None:
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

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Find `tokenizer.model` (or `tokenizer.model.v1`) in a checkpoint folder."""
        path = Path(path)
        if path.is_file():
            return cls(path)
        if not path.exists():
            raise CheckpointError(f"tokenizer path {str(path)!r} does not exist; give a tokenizer.model or its folder")
        for name in TOKENIZER_NAMES:
            if (path / name).is_file():
                return cls(path / name)
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
    def pad_id(self) -> int:
        return self._sp.pad_id()

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
