"""Shared fixtures: a tiny Mistral-format checkpoint with its own small sentencepiece tokenizer."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from pp_runtime.model.args import ModelArgs, preset
from ckpt_helpers import random_state_dict, save_mistral_checkpoint

REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the cat sat on a mat while two dogs ran past seven red boxes and one blue kite "
          "flew over green hills near quiet rivers where small fish swim every day").split()


def write_text_docs(path: Path, n: int = 24, min_words: int = 3, seed: int = 3) -> Path:
    """A JSONL fine-tuning file of `n` {"text": ...} documents of min_words..12 words."""
    import json

    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, 12)))})
                            + "\n" for _ in range(n)))
    return path


def train_tokenizer(out: Path, vocab_size: int = 200, seed: int = 0, name: str = "tokenizer.model",
                    user_defined_symbols: tuple[str, ...] = (), control_symbols: tuple[str, ...] = ()) -> Path:
    """A small unigram model (BOS=1, EOS=2 as Mistral's) trained on generated sentences, in well under a second.
    `user_defined_symbols` are pieces of their own in text (as `[INST]` could be); `control_symbols` take the
    ids after EOS and never come out of text (Mistral's v3 tokenizer: `[INST]` 3, `[/INST]` 4)."""
    rng = random.Random(seed)
    text = "\n".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=False,
        character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False,
        **({"user_defined_symbols": list(user_defined_symbols)} if user_defined_symbols else {}),
        **({"control_symbols": list(control_symbols)} if control_symbols else {}),
    )
    path = out / name
    path.write_bytes(model.getvalue())
    return path


def write_tiny_checkpoint(out: Path, name: str = "tiny", seed: int = 0, **overrides) -> ModelArgs:
    """Random weights of a preset, its vocabulary sized to the tokenizer trained beside it."""
    import sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(train_tokenizer(out))).vocab_size()
    args: ModelArgs = preset(name, vocab_size=vocab, **overrides)
    # std 0.3 instead of 0.02: peaked logits, so greedy decoding has no near-ties to flip
    state = {k: v if k.endswith("norm.weight") else v * 15 for k, v in random_state_dict(args, seed=seed).items()}
    save_mistral_checkpoint(out, args, state)
    return args


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Mistral-format tiny dense model (4 layers, window 16) with a 200-piece tokenizer."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    write_tiny_checkpoint(out, "tiny")
    return out


@pytest.fixture(scope="session")
def tiny_moe_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_moe_ckpt")
    write_tiny_checkpoint(out, "tiny-moe")
    return out
