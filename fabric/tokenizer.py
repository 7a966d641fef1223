"""Byte-level tokenizer of the built-in presets: ids 0..255 are bytes, then BOS and EOS; and
the tokenizer, chat template and EOS ids of a real checkpoint (`load_tokenizer`, `chat_template`,
`generation_eos_ids`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
CACHE_ENV = "KV_FABRIC_CACHE"        # where converted GGUF tokenizers are kept


def cache_root() -> str:
    """`$KV_FABRIC_CACHE`, else `$XDG_CACHE_HOME/kv-fabric`, else `~/.cache/kv-fabric`."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return root
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kv-fabric")


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
        return _gguf_tokenizer(path)
    if not (os.path.isfile(os.path.join(path, "tokenizer.json"))
            or os.path.isfile(os.path.join(path, "tokenizer.model"))):
        return None
    auto = _auto_tokenizer(path)
    return None if auto is None else auto.from_pretrained(path)


def _auto_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        warnings.warn(f"the tokenizer of {path!r} needs transformers (pip install "
                      f"transformers); prompts must be token ids", stacklevel=4)
        return None
    return AutoTokenizer


def _gguf_tokenizer(path: str):
    """transformers' tokenizer of a GGUF file, kept as `tokenizer.save_pretrained` files under
    `cache_root()`: building it from the file's vocabulary takes seconds of CPU in every process
    (each instance, standby and driver), loading the saved `tokenizer.json` a fraction of one.
    The entry is named after the file (real path, size, modification time) and transformers'
    version, written to a temporary directory and renamed into place, so a reader never sees
    half of one; one that does not load is built again. Without a writable cache, no cache."""
    auto = _auto_tokenizer(path)
    if auto is None:
        return None
    entry = gguf_cache_entry(path)
    if os.path.isfile(os.path.join(entry, "tokenizer.json")):
        try:
            return auto.from_pretrained(entry)
        except Exception as e:                       # a damaged entry: build it again
            warnings.warn(f"cached tokenizer {entry!r} does not load ({e}); rebuilding it",
                          stacklevel=4)
            shutil.rmtree(entry, ignore_errors=True)
    tokenizer = auto.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    try:
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(entry))
        try:
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, entry)                    # fails if another process got there first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
    return tokenizer


def gguf_cache_entry(path: str) -> str:
    """The cache directory of the tokenizer of the GGUF file `path` (see `_gguf_tokenizer`)."""
    import transformers

    path = os.path.realpath(path)
    st = os.stat(path)
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    name = os.path.basename(path).removesuffix(".gguf")
    return os.path.join(cache_root(), "tokenizers",
                        f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


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
