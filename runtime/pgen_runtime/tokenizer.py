"""Tokenizers: the package's HF `tokenizers` JSON when it has one, a byte-level tokenizer otherwise."""

from __future__ import annotations

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
        data = bytes(t - self.offset for t in token_ids if self.offset <= t < self.offset + 256)
        return data.decode("utf-8", errors="replace")


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


def load_tokenizer(package_root: str | Path, vocab_size: int) -> Tokenizer:
    """The package's `tokenizer.json` when present, else a `ByteTokenizer` over its vocabulary."""
    path = Path(package_root) / TOKENIZER_FILE
    return HFTokenizer(path) if path.is_file() else ByteTokenizer(vocab_size)
