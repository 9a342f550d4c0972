"""Text adapter: the payload is the UTF-8 bytes exactly as stored (DESIGN.md §3)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import TEXT, Modality, check_limit, positive_limit, register

JSON_EXTENSIONS = (".json", ".jsonl")


@dataclass
class TextSettings:
    field: str = "text"  # JSON/JSONL record field that holds the document text
    # Largest stored member (a .txt/.json/.jsonl file) read, in bytes; None: no limit.
    max_member_bytes: int | None = 128 * 2**20

    def __post_init__(self) -> None:
        positive_limit("max_member_bytes", self.max_member_bytes)


def json_texts(data: bytes, extension: str, field: str = "text") -> Iterator[tuple[int, str | None]]:
    """Yield ``(record index, text)`` for each record of a ``.json`` or ``.jsonl`` document.

    ``.json`` holds one object or a list of objects; ``.jsonl`` one object per non-empty line.
    ``text`` is None for a record without a string ``field``, so a caller can count the skip.
    Raises ValueError on malformed JSON (naming the line for ``.jsonl``).
    """
    if extension == ".jsonl":
        records: list[Any] = []
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"line {lineno}: invalid JSON ({e.msg})") from None
    elif extension == ".json":
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON ({e.msg} at line {e.lineno})") from None
        records = obj if isinstance(obj, list) else [obj]
    else:
        raise ValueError(f"not a JSON extension: {extension!r}; expected one of {JSON_EXTENSIONS}")
    for i, rec in enumerate(records):
        text = rec.get(field) if isinstance(rec, dict) else None
        yield i, text if isinstance(text, str) else None


def split_documents(data: bytes, max_bytes: int) -> Iterator[bytes]:
    """Cut ``data`` into consecutive pieces of at most ``max_bytes``, at line ends (b"\\n").

    A single line longer than ``max_bytes`` is cut inside, backing off to a UTF-8 character
    boundary. Concatenating the pieces gives back ``data`` exactly.
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be at least 4 (one UTF-8 character), got {max_bytes}")
    start, n = 0, len(data)
    while start < n:
        end = min(start + max_bytes, n)
        if end < n:
            newline = data.rfind(b"\n", start, end)
            if newline >= 0:
                end = newline + 1
            else:  # no line end in reach: cut before a UTF-8 continuation byte (0b10xxxxxx)
                while end > start + 1 and (data[end] & 0xC0) == 0x80:
                    end -= 1
        yield data[start:end]
        start = end


@register
class TextModality(Modality):
    """UTF-8 text. Members are ``.txt`` files whose bytes are the payload unchanged.

    ``encode`` also reads JSON members when the caller passes ``meta["extension"]`` of
    ``.json``/``.jsonl``: the payload is then the record's ``field`` (JSONL records joined
    by ``\\n``).
    """

    name = "text"
    tag = TEXT
    extensions = (".txt",)
    Settings = TextSettings

    def check_size(self, nbytes: int) -> None:
        """Raise `ResourceLimitError` for a member above ``max_member_bytes``."""
        check_limit(f"text member of {nbytes:,} bytes", nbytes, "max_member_bytes", self.settings.max_member_bytes)

    def encode(self, member_bytes: bytes, meta: dict | None = None) -> bytes:
        self.check_size(len(member_bytes))
        extension = (meta or {}).get("extension", ".txt")
        if extension not in JSON_EXTENSIONS:
            return bytes(member_bytes)
        texts = []
        for i, text in json_texts(member_bytes, extension, self.settings.field):
            if text is None:
                raise ValueError(f"JSON record {i} has no string field {self.settings.field!r}")
            texts.append(text)
        return "\n".join(texts).encode("utf-8")

    def decode(self, payload: bytes) -> str:
        """Payload -> str; invalid UTF-8 (e.g. a sample cut mid-character) becomes U+FFFD."""
        return bytes(payload).decode("utf-8", errors="replace")

    def save(self, obj: str | bytes, path) -> None:
        data = obj.encode("utf-8") if isinstance(obj, str) else bytes(obj)
        Path(path).write_bytes(data)
