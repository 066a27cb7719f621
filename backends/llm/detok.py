"""Incremental detokenization: text deltas of whole characters, held back across stop strings."""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
_CONTEXT = 5  # prompt tokens decoded before the first output token (tokenizers that merge spaces)


def byte_table(tokenizer) -> list[bytes] | None:
    """Each token id's bytes, for byte-level BPE tokenizers (GPT-2 style); None for any other kind.

    With it, detokenizing is appending bytes to an incremental UTF-8 decoder: exact (it is what
    ``decode`` does for these tokenizers, special tokens skipped) and far cheaper than decoding a
    window of tokens every step.
    """
    try:
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except (AttributeError, ImportError, ValueError):
        return None
    if decoder.get("type") != "ByteLevel":
        return None
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.get_added_vocab().values()}
    table: list[bytes] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or token is None:
            table.append(b"")
        elif i in added:  # added tokens are stored as plain text
            table.append(token.encode("utf-8"))
        else:
            try:
                table.append(bytes(to_byte[c] for c in token))
            except KeyError:
                return None
    return table


class ByteDetokenizer:
    """Detokenizer for byte-level vocabularies: an incremental UTF-8 decoder holds back a character
    whose bytes are not all there yet, so every delta is whole characters."""

    def __init__(self, table: list[bytes]) -> None:
        self.table = table
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_id: int) -> str:
        return self.decoder.decode(self.table[token_id] if 0 <= token_id < len(self.table) else b"")

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class Detokenizer:
    """Turns one token at a time into text deltas (any tokenizer).

    Decoding a window ``ids[prefix:]`` and comparing it with ``ids[prefix:read]`` gives the text
    the newest tokens added without decoding everything each step. A window that ends in U+FFFD
    ends inside a UTF-8 character (byte-level vocabularies split characters across tokens): it
    is held back until the character is complete, so every delta is whole characters.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if after.endswith(_REPLACEMENT) or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end) once generation ends."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopText:
    """Output text with stop strings: releases only text that cannot be the start of a stop string."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self.stops = list(stops)
        self.include = include_stop
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0  # characters of text already released

    def add(self, delta: str) -> tuple[str, bool]:
        """(releasable delta, stopped). When stopped, the text ends at (or after) the stop string."""
        if not delta:
            return "", False
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        if self.stops:
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[:i + len(s)] if self.include else self.text[:i]
                return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held()), False

    def finish(self) -> str:
        return self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for n in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out
