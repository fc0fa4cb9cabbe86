"""Reading a user's line-oriented text file (labelled sentences, sentence pairs): UTF-8 errors name the line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def text_lines(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line of `path`, without its line break.

    A line that is not UTF-8 raises `error` naming the file, the line, the byte and its column.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise error(
                    f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    f"save the file as UTF-8"
                ) from None
            if line.strip():
                yield n, line
