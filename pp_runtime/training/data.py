"""Training data: JSONL documents -> token ids + loss mask -> fixed-length packed rows.

Two line formats:

- ``{"text": "..."}`` (continued pretraining): ``BOS + text + EOS``, loss on every next token;
- ``{"prompt": "...", "completion": "..."}``: ``BOS + prompt + completion + EOS``, loss only on
  the completion tokens and the EOS. Prompt and completion are tokenised separately, exactly as
  inference sees them (prompt tokens, then generated tokens).

Documents are packed whole, in file order, into rows of ``seq_len`` tokens; when the next
document does not fit, the rest of the row is padding (its own segment, no loss) and a new row
starts. A document longer than ``seq_len`` is cut into ``seq_len`` pieces (each piece attends
only to itself). Each row keeps its document lengths, from which the block-diagonal mask is
built (`attention_meta.build_training_meta`), so packed documents never see each other.

Targets are aligned with the inputs: ``targets[i]`` is the token that follows ``tokens[i]`` in
the same document, or ``IGNORE`` (-100) where there is none or the loss mask is off. So a row is
fed as is (no shift) and the last token of a document is never trained to predict the next one.

The row order is a deterministic stream: epoch e visits all rows in a permutation seeded by
(seed, e). A position in the stream (rows consumed so far) is all a resume needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from pp_runtime.errors import ConfigError, InputError
from pp_runtime.io.jsonl import check_utf8, iter_lines

IGNORE = -100


@dataclass(frozen=True)
class Document:
    """Token ids and, per token, whether it is a training target (predicted from what precedes it)."""

    tokens: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.loss_mask):
            raise ValueError("tokens and loss_mask must have the same length")
        if not self.tokens:
            raise ValueError("a document needs at least one token")

    def targets(self) -> list[int]:
        """Next-token targets aligned with `tokens`; IGNORE where there is no (masked-in) next token."""
        t, m = self.tokens, self.loss_mask
        return [t[i + 1] if m[i + 1] else IGNORE for i in range(len(t) - 1)] + [IGNORE]


def parse_line(obj: object, where: str, tokenizer) -> Document:
    """One JSONL record -> Document; InputError naming `where` for anything unexpected."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else []
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise InputError(f"{where}: \"text\" must be a string, got {type(obj['text']).__name__}")
        ids = bos + tokenizer.encode(obj["text"], bos=False) + eos
        return Document(ids, [False] * len(bos) + [True] * (len(ids) - len(bos)))
    if "prompt" in obj and "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise InputError(f"{where}: \"{key}\" must be a string, got {type(obj[key]).__name__}")
        prompt = bos + tokenizer.encode(obj["prompt"], bos=False)
        completion = tokenizer.encode(obj["completion"], bos=False) + eos
        if not completion:
            raise InputError(f"{where}: the completion is empty and there is no EOS to train on")
        return Document(prompt + completion, [False] * len(prompt) + [True] * len(completion))
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise InputError(
        f"{where}: expected {{\"text\": ...}} or {{\"prompt\": ..., \"completion\": ...}}, got keys: {keys}"
    )


def read_documents(path: str | Path, tokenizer) -> list[Document]:
    """Every non-blank line of a JSONL file; an empty file or a bad line is an InputError with its line number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {str(path)!r} does not exist; set data.path to a JSONL file")
    docs: list[Document] = []
    for no, line in iter_lines(path):
        where = f"{path} line {no}"
        check_utf8(line, where)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        docs.append(parse_line(obj, where, tokenizer))
    if not docs:
        raise InputError(f"data file {path} is empty: it needs JSONL lines of {{\"text\": ...}} or {{\"prompt\": ..., \"completion\": ...}}")
    return docs


@dataclass(frozen=True)
class Batch:
    """Rows of one (micro-)batch: tokens and targets [R, L]; doc_lens[r] sums to L."""

    tokens: torch.Tensor
    targets: torch.Tensor
    doc_lens: list[list[int]]

    @property
    def n_valid(self) -> int:
        return int((self.targets != IGNORE).sum())

    def split(self, n: int) -> list["Batch"]:
        """`n` micro-batches of equal row count (the caller checks divisibility)."""
        per = self.tokens.shape[0] // n
        return [Batch(self.tokens[i * per:(i + 1) * per], self.targets[i * per:(i + 1) * per],
                      self.doc_lens[i * per:(i + 1) * per]) for i in range(n)]


class PackedDataset:
    """Fixed-length rows of packed documents and a deterministic, resumable row stream."""

    def __init__(self, tokens: torch.Tensor, targets: torch.Tensor, doc_lens: list[list[int]],
                 shuffle: bool = True, seed: int = 0) -> None:
        self.tokens, self.targets, self.doc_lens = tokens, targets, doc_lens
        self.shuffle, self.seed = shuffle, seed
        self._perm_cache: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------------------- building
    @classmethod
    def from_documents(cls, docs: Sequence[Document], seq_len: int, pad_id: int = 0,
                       shuffle: bool = True, seed: int = 0) -> "PackedDataset":
        if seq_len < 2:
            raise ConfigError(f"data.seq_len={seq_len}: need at least 2 tokens per row")
        rows_tok: list[list[int]] = []
        rows_tgt: list[list[int]] = []
        rows_lens: list[list[int]] = []
        cur_tok: list[int] = []
        cur_tgt: list[int] = []
        cur_lens: list[int] = []

        def close_row() -> None:
            nonlocal cur_tok, cur_tgt, cur_lens
            if not cur_tok:
                return
            pad = seq_len - len(cur_tok)
            if pad:
                cur_tok += [pad_id] * pad
                cur_tgt += [IGNORE] * pad
                cur_lens.append(pad)
            rows_tok.append(cur_tok)
            rows_tgt.append(cur_tgt)
            rows_lens.append(cur_lens)
            cur_tok, cur_tgt, cur_lens = [], [], []

        for doc in docs:
            tok, tgt = doc.tokens, doc.targets()
            for a in range(0, len(tok), seq_len):
                piece_tok, piece_tgt = tok[a:a + seq_len], tgt[a:a + seq_len]
                if len(cur_tok) + len(piece_tok) > seq_len:
                    close_row()
                cur_tok += piece_tok
                cur_tgt += piece_tgt
                cur_lens.append(len(piece_tok))
                if len(cur_tok) == seq_len:
                    close_row()
        close_row()
        if not rows_tok:
            raise InputError("no documents to pack")
        return cls(torch.tensor(rows_tok, dtype=torch.long), torch.tensor(rows_tgt, dtype=torch.long),
                   rows_lens, shuffle=shuffle, seed=seed)

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer, seq_len: int, shuffle: bool = True, seed: int = 0) -> "PackedDataset":
        docs = read_documents(path, tokenizer)
        return cls.from_documents(docs, seq_len, pad_id=_pad_id(tokenizer), shuffle=shuffle, seed=seed)

    @classmethod
    def from_records(cls, records: Sequence[dict], tokenizer, seq_len: int, shuffle: bool = True, seed: int = 0,
                     source: str = "record") -> "PackedDataset":
        """Records of the JSONL line formats held in memory (the demo task's generated questions)."""
        docs = [parse_line(r, f"{source} {i}", tokenizer) for i, r in enumerate(records)]
        return cls.from_documents(docs, seq_len, pad_id=_pad_id(tokenizer), shuffle=shuffle, seed=seed)

    # ---------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache[epoch] = torch.randperm(len(self), generator=gen)
        return self._perm_cache[epoch]

    def row_at(self, position: int) -> int:
        """Index of the row at `position` of the stream (epoch after epoch)."""
        epoch, i = divmod(int(position), len(self))
        return int(self._perm(epoch)[i]) if self.shuffle else i

    def batch(self, position: int, n_rows: int) -> Batch:
        """Rows [position, position + n_rows) of the stream."""
        idx = [self.row_at(position + k) for k in range(n_rows)]
        t = torch.tensor(idx, dtype=torch.long)
        return Batch(self.tokens.index_select(0, t), self.targets.index_select(0, t), [list(self.doc_lens[i]) for i in idx])

    def epoch_of(self, position: int) -> float:
        return position / len(self)

    def fingerprint(self) -> dict:
        """Identifies the packed data in a checkpoint manifest (to warn when it changed on resume)."""
        return {"rows": len(self), "seq_len": self.seq_len, "tokens_sum": int(self.tokens.sum()),
                "valid_targets": int((self.targets != IGNORE).sum())}


def _pad_id(tokenizer) -> int:
    return tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else 0


def check_batch_shape(batch_size: int, data_parallel: int, microbatches: int) -> int:
    """Rows per micro-batch; a batch that does not divide evenly is a ConfigError saying how to fix it."""
    if batch_size < 1:
        raise ConfigError(f"train.batch_size={batch_size} must be at least 1")
    parts = data_parallel * microbatches
    if batch_size % parts:
        lo = max(parts, batch_size - batch_size % parts)
        raise ConfigError(
            f"train.batch_size={batch_size} does not divide into {data_parallel} data-parallel replica(s) x "
            f"{microbatches} micro-batches; use a multiple of {parts} (e.g. train.batch_size={lo}) "
            "or change schedule.microbatches"
        )
    return batch_size // parts


def validate_token_ids(dataset: PackedDataset, vocab_size: int, source: Optional[str] = None) -> None:
    top = int(dataset.tokens.max())
    if top >= vocab_size:
        raise ConfigError(
            f"the data has token id {top} but the model's vocab_size is {vocab_size}"
            + (f" (tokenizer {source})" if source else "")
            + "; use the model's own tokenizer or raise vocab_size (model.args)"
        )
