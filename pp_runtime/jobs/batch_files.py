"""A batch job's files on disk: where each lives, resuming from what a killed run left (truncated part
files, lines already answered), appending results durably, and the final sorted merge. The file
layout and restart rules are described in pp_runtime/jobs/batch.py."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pp_runtime.errors import ConfigError
from pp_runtime.io.jsonl import iter_lines
from pp_runtime.jobs.config import resolve_path
from pp_runtime.jobs.settings import BatchSettings

FSYNC_EVERY_S = 10.0

# --------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class BatchPaths:
    input: Path
    output: Path
    errors: Path

    @classmethod
    def from_config(cls, cfg: BatchSettings) -> "BatchPaths":
        if not cfg.input:
            raise ConfigError("batch inference needs input=FILE.jsonl (one {\"id\", \"prompt\"} object per line)")
        if not cfg.output:
            raise ConfigError("batch inference needs output=FILE.jsonl (results are appended there)")
        inp, out = resolve_path(cfg.input), resolve_path(cfg.output)
        err = resolve_path(cfg.errors) if cfg.errors else out.with_name(out.name + ".errors.jsonl")
        if inp == out or inp == err:
            raise ConfigError(f"output/errors would overwrite the input {str(inp)!r}; choose another output=")
        return cls(inp, out, err)

    def part(self, replica: int) -> Path:
        return self.output.with_name(f"{self.output.name}.part-{replica}")

    def error_part(self, replica: int) -> Path:
        return self.errors.with_name(f"{self.errors.name}.part-{replica}")

    @property
    def sidecar(self) -> Path:
        return self.output.with_name(self.output.name + ".job.json")

    @property
    def lock(self) -> Path:
        return self.output.with_name(self.output.name + ".lock")

    @property
    def summary(self) -> Path:
        return self.output.with_name(self.output.name + ".summary.json")

    def parts(self) -> list[Path]:
        """Every result part file present, whatever data_parallel the run that wrote it used."""
        return _numbered(self.output, "part")

    def error_parts(self) -> list[Path]:
        return _numbered(self.errors, "part")

    def has_results(self) -> bool:
        return self.output.is_file() or bool(self.parts())

    def discard_results(self) -> None:
        """overwrite=true: remove everything an earlier run left beside the output."""
        for p in [self.output, *self.parts(), self.errors, *self.error_parts(), self.summary, self.sidecar]:
            p.unlink(missing_ok=True)


def _numbered(base: Path, tag: str) -> list[Path]:
    pat = re.compile(re.escape(base.name) + rf"\.{tag}-(\d+)$")
    if not base.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.parent.iterdir() if (m := pat.match(p.name))]
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------- resume bookkeeping


class LineSet:
    """A set of input line numbers as a bitmap: a million lines cost 125 kB."""

    def __init__(self, data: bytes = b"") -> None:
        self.bits = bytearray(data)

    def add(self, n: int) -> None:
        byte = n >> 3
        if byte >= len(self.bits):
            self.bits.extend(b"\0" * (byte + 1 - len(self.bits) + 1024))
        self.bits[byte] |= 1 << (n & 7)

    def __contains__(self, n: int) -> bool:
        byte = n >> 3
        return byte < len(self.bits) and bool(self.bits[byte] & (1 << (n & 7)))

    def __len__(self) -> int:
        return sum(b.bit_count() for b in self.bits)


def repair_jsonl(path: Path) -> int:
    """Truncate whatever follows the last complete, parseable line (a write cut off by kill -9 or a
    lost page cache). Returns the number of bytes removed."""
    if not path.is_file():
        return 0
    size = path.stat().st_size
    good_end = 0
    with open(path, "rb") as f:
        for raw in iter(f.readline, b""):
            if not raw.endswith(b"\n"):
                break
            if raw.strip():
                try:
                    json.loads(raw)
                except ValueError:
                    continue  # a damaged line in the middle: kept, ignored when read, dropped by the merge
            good_end = f.tell()
    if good_end < size:  # a partial line, or a damaged block at the end
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return size - good_end


def iter_records(path: Path) -> Iterator[tuple[int, int, dict]]:
    """(offset, length, record) of each complete JSON object line of a results file."""
    with open(path, "rb") as f:
        offset = 0
        for raw in iter(f.readline, b""):
            n = len(raw)
            if raw.endswith(b"\n") and raw.strip():
                try:
                    rec = json.loads(raw)
                except ValueError:
                    rec = None
                if isinstance(rec, dict) and isinstance(rec.get("line"), int):
                    yield offset, n, rec
            offset += n


@dataclass
class ResumeState:
    done: LineSet
    n_done: int
    input_lines: int  # non-blank lines in the input
    repaired_bytes: int = 0
    offsets: dict[str, int] = field(default_factory=dict)  # part file -> size when the run started


def prepare_resume(paths: BatchPaths) -> ResumeState:
    """Rank 0, before any replica writes: repair the parts, collect the finished lines, drop the last
    run's errors (error lines are checked again), markers and summary, count the input."""
    probes = paths.output.parent.glob(f".{paths.output.name}.probe-*") if paths.output.parent.is_dir() else []
    for stale in [*paths.error_parts(), paths.errors, paths.summary, *probes,
                  paths.output.with_name(paths.output.name + ".tmp")]:
        stale.unlink(missing_ok=True)
    done, repaired, offsets = LineSet(), 0, {}
    sources = ([paths.output] if paths.output.is_file() else []) + paths.parts()
    for src in sources:
        if src != paths.output:
            repaired += repair_jsonl(src)
            offsets[str(src)] = src.stat().st_size
        for _, _, rec in iter_records(src):
            done.add(rec["line"])
    n_input = sum(1 for _ in iter_lines(paths.input))
    return ResumeState(done, len(done), n_input, repaired, offsets)


def merge_results(sources: list[Path], dest: Path) -> int:
    """Write one line per input line, sorted by input line number, from `sources` (earlier sources
    win a duplicate). Memory: a few integers per line; the records are copied by offset."""
    from array import array

    keys, srcs, offs, lens = array("q"), array("l"), array("q"), array("q")
    for i, src in enumerate(sources):
        if not src.is_file():
            continue
        for off, n, rec in iter_records(src):
            keys.append(rec["line"])
            srcs.append(i)
            offs.append(off)
            lens.append(n)
    order = sorted(range(len(keys)), key=lambda j: (keys[j], srcs[j]))
    tmp = dest.with_name(dest.name + ".tmp")
    handles = [open(s, "rb") if s.is_file() else None for s in sources]
    written, last = 0, None
    try:
        with open(tmp, "wb") as out:
            for j in order:
                if keys[j] == last:
                    continue
                last = keys[j]
                h = handles[srcs[j]]
                h.seek(offs[j])
                out.write(h.read(lens[j]))
                written += 1
            out.flush()
            os.fsync(out.fileno())
    finally:
        for h in handles:
            if h is not None:
                h.close()
    tmp.replace(dest)
    return written


# ----------------------------------------------------------------------------------------- writing


class JsonlAppender:
    """Append one JSON object per line; flushed per line (survives kill -9), fsynced every few seconds
    and on close (survives a node crash up to the last few seconds)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")
        self._synced = time.monotonic()

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        self._f.flush()
        if time.monotonic() - self._synced > FSYNC_EVERY_S:
            os.fsync(self._f.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def error_record(line_no: int, line: str, reason: str) -> dict:
    return {"line": line_no, "id": _guess_id(line), "error": reason}


def _guess_id(line: str) -> Any:
    try:
        obj = json.loads(line.encode("utf-8"))
    except ValueError:  # not JSON, or not UTF-8 (UnicodeEncodeError)
        return None
    if not isinstance(obj, dict):
        return None
    rid = obj.get("custom_id", obj.get("id"))
    return rid if isinstance(rid, (str, int, float)) or rid is None else str(rid)


def iter_share(path: Path, dp_rank: int, dp_size: int, done: LineSet) -> Iterator[tuple[int, int, str]]:
    """(uid, line number, line) of this replica's lines not yet done."""
    for uid, (line_no, line) in enumerate(iter_lines(path)):
        if uid % dp_size == dp_rank and line_no not in done:
            yield uid, line_no, line
