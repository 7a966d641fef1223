"""Byte-level tokenizer of the built-in presets: ids 0..255 are bytes, then BOS and EOS; and
the tokenizer, chat template and EOS ids of a real checkpoint (`load_tokenizer`, `chat_template`,
`generation_eos_ids`)."""

from __future__ import annotations

import json
import os
import threading
import warnings

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


# ---- the checkpoint's tokenizer, chat template and EOS ids ---------------------------------------
_LOCK = threading.Lock()
_LOADED: dict[tuple, object] = {}


def _model_fields(model_cfg) -> tuple[str | None, str | None]:
    """(preset, path) of a `ModelConfig` or of its dict (the path resolved: a file preset's
    path is set at the config edge; a direct call resolves it the same way)."""
    get = model_cfg.get if isinstance(model_cfg, dict) else \
        (lambda k, d=None: getattr(model_cfg, k, d))
    preset, path = get("preset"), get("path")
    if path is None and preset is not None:
        from fabric.model.args import FILE_PRESETS, preset_path

        if preset in FILE_PRESETS:
            path = preset_path(preset)
    return (None if path is not None else preset), \
        (os.path.realpath(os.fspath(path)) if path is not None else None)


def load_tokenizer(model_cfg):
    """The tokenizer of a `model:` config section, loaded at most once per process:

    - a built-in random preset: `ByteTokenizer`;
    - a Hugging Face directory with `tokenizer.json` or `tokenizer.model`:
      `transformers.AutoTokenizer.from_pretrained(dir)`;
    - a `.gguf` file with a vocabulary in its metadata: transformers' GGUF tokenizer
      (`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), chat template included;
    - otherwise None (prompts must then be token ids)."""
    key = _model_fields(model_cfg)
    with _LOCK:                     # one load per process, even from concurrent threads
        if key not in _LOADED:
            _LOADED[key] = _load_tokenizer(*key)
        return _LOADED[key]


def _load_tokenizer(preset: str | None, path: str | None):
    if path is None:
        from fabric.model.args import PRESETS

        return ByteTokenizer(PRESETS[preset].vocab_size)
    from fabric.model import gguf

    if gguf.is_gguf(path):
        if gguf.metadata_value(path, "tokenizer.ggml.model") is None:
            return None
        kwargs = {"gguf_file": os.path.basename(path)}
        where = os.path.dirname(path)
    elif os.path.isfile(os.path.join(path, "tokenizer.json")) or \
            os.path.isfile(os.path.join(path, "tokenizer.model")):
        kwargs, where = {}, path
    else:
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        warnings.warn(f"the tokenizer of {path!r} needs transformers (pip install "
                      f"transformers); prompts must be token ids", stacklevel=3)
        return None
    return AutoTokenizer.from_pretrained(where, **kwargs)


def chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template (Jinja), or None when it has none (the byte tokenizer)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):                     # named templates: the default one
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) and template else None


def generation_eos_ids(model_cfg) -> list[int]:
    """The token ids that end generation: `generation_config.json`'s `eos_token_id` (else
    `config.json`'s) in a Hugging Face directory; a GGUF file's EOS (and EOT/EOM where named);
    a preset's EOS. For SmolLM2-Instruct that is [2], `<|im_end|>`, which ends each chat turn."""
    preset, path = _model_fields(model_cfg)
    if path is None:
        from fabric.model.args import PRESETS

        eos = PRESETS[preset].eos_token_id
        return [] if eos is None else [eos]
    from fabric.model import gguf

    if gguf.is_gguf(path):
        return gguf.eos_token_ids(path)
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file) as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            return list(dict.fromkeys(int(i) for i in ids))
    return []
