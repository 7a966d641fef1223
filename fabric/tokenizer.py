"""Byte-level tokenizer of the built-in presets: ids 0..255 are bytes, then BOS and EOS."""

from __future__ import annotations

NUM_BYTES = 256


class ByteTokenizer:
    """Text <-> ids for the built-in models. Needs a vocabulary of at least 258 ids."""

    def __init__(self, vocab_size: int):
        if vocab_size < NUM_BYTES + 2:
            raise ValueError(f"byte tokenizer needs vocab_size >= {NUM_BYTES + 2}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_id = NUM_BYTES
        self.eos_id = NUM_BYTES + 1

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if 0 <= i < NUM_BYTES)       # BOS/EOS carry no text
        return data.decode("utf-8", errors="replace")
