"""Tokenizers: the package's HF `tokenizers` JSON when it has one, a byte-level tokenizer otherwise."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol

from .errors import ConfigError, ShapeError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids: byte b is id b + `offset`; the ids below `offset` are specials.

    Decoding skips special ids and ids past the bytes; invalid UTF-8 decodes to U+FFFD.
    """

    def __init__(self, vocab_size: int, offset: int = 3) -> None:
        self.vocab_size = vocab_size
        self.offset = offset

    def encode(self, text: str) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        if ids and max(ids) >= self.vocab_size:
            raise ShapeError(f"the text holds byte {max(ids) - self.offset}, which the model's vocabulary of "
                             f"{self.vocab_size} ids cannot represent; pass token ids instead")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.to_bytes(token_ids).decode("utf-8", errors="replace")

    def to_bytes(self, token_ids: list[int]) -> bytes:
        """The bytes of `token_ids`, special ids and ids past the bytes skipped."""
        return bytes(t - self.offset for t in token_ids if self.offset <= t < self.offset + 256)


class HFTokenizer:
    """A HF `tokenizers` JSON file (needs the `tokenizers` package)."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as err:
            raise ConfigError(f"{path} needs the `tokenizers` package; pip install tokenizers") from err
        self._tok = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)


class IncrementalDecoder:
    """The text of a growing list of token ids, decoding only the ids since the last whole character.

    Decoding the whole list after every token costs O(n) per token (O(n^2) per sequence), which a
    serving loop pays for every sequence of every step. The byte-level tokenizer streams through
    Python's incremental UTF-8 decoder; another tokenizer decodes the window from the previous
    emission on (so one that merges across tokens still decodes right) and emits the new text once
    it ends in a whole character.
    """

    __slots__ = ("tokenizer", "text", "_prefix", "_read", "_utf8")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""  # whole characters decoded so far
        self._prefix = 0  # window start: the ids of the previous emission
        self._read = 0  # ids decoded into `text`
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if type(tokenizer) is ByteTokenizer else None

    def push(self, token_ids: list[int]) -> str:
        """`text` after the ids appended since the last call (trailing partial characters held back)."""
        if self._utf8 is not None:
            self.text += self._utf8.decode(self._bytes(token_ids))
            return self.text
        prefix_text, new_text = self._window(token_ids)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(token_ids)
        return self.text

    def final(self, token_ids: list[int]) -> str:
        """The whole text, a trailing partial character included (as U+FFFD); ends the stream."""
        if self._utf8 is not None:
            self.text += self._utf8.decode(self._bytes(token_ids), final=True)
            return self.text
        prefix_text, new_text = self._window(token_ids)
        return self.text + new_text[len(prefix_text):]

    def _bytes(self, token_ids: list[int]) -> bytes:
        start, self._read = self._read, len(token_ids)
        return self.tokenizer.to_bytes(token_ids[start:])

    def _window(self, token_ids: list[int]) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(token_ids[self._prefix:self._read]), decode(token_ids[self._prefix:])


def load_tokenizer(package_root: str | Path, vocab_size: int) -> Tokenizer:
    """The package's `tokenizer.json` when present, else a `ByteTokenizer` over its vocabulary."""
    path = Path(package_root) / TOKENIZER_FILE
    return HFTokenizer(path) if path.is_file() else ByteTokenizer(vocab_size)
