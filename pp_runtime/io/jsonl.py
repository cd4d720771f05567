"""JSONL input read line by line: one bad line is reported by its number and never costs the rest
of a file, which is never loaded whole."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from pp_runtime.errors import InputError


def check_input_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"input file {str(path)!r} does not exist; check input=")


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Stream non-blank lines with their 1-based numbers; the file is never loaded whole. Bytes that
    are not UTF-8 are kept (as surrogates), so only their own line is rejected, by parse_prompt_line."""
    check_input_file(path)
    with open(path, "rb") as f:
        for no, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="surrogateescape")
            if line.strip():
                yield no, line


def check_utf8(line: str, where: str) -> None:
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(line[e.start]) - 0xDC00
        raise InputError(f"{where}: not valid UTF-8 (byte 0x{byte:02x} at column {e.start + 1}); "
                         "save the file as UTF-8") from None
