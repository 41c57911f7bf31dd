"""A language model's tokenizer: a `tokenizers` tokenizer (from tokenizer.json, or rebuilt from a GGUF file's
vocabulary and merges) plus its special tokens and chat template, rendered with jinja2 as transformers
does."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from duomo.errors import CheckpointError, InputError

# GGUF `tokenizer.ggml.pre` names whose split differs from GPT-2's: llama.cpp splits digits one by one for
# SmolLM ("\p{N}" before the GPT-2 pattern), as the model's original tokenizer.json does (`Digits`).
_SPLIT_DIGITS = {"smollm"}
_GGUF_CONTROL = 3


@dataclass
class LMTokenizer:
    """Text <-> ids for a causal LM; `render(messages)` applies the model's chat template."""

    backend: Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    add_bos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; special tokens written in it (e.g. <|im_start|>) stay whole."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self) -> Any:
        if not self.chat_template:
            raise InputError("this model's tokenizer has no chat template; pass plain text instead")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(
            x: Any,
            ensure_ascii: bool = False,
            indent: Any = None,
            separators: Any = None,
            sort_keys: bool = False,
        ) -> str:
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        # the environment transformers renders chat templates in
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation [{"role": ..., "content": ...}, ...] in the model's format."""
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
            )
        except TemplateError as exc:
            raise InputError(f"the chat template refused this conversation: {exc}") from exc

    def save(self, directory: Path) -> None:
        """tokenizer.json + tokenizer_config.json, the files transformers reads."""
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.extra.get("model_max_length", 8192),
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-like {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_dir(directory: Path) -> LMTokenizer:
    """The tokenizer of a transformers model directory (tokenizer.json, tokenizer_config.json)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no tokenizer.json; duomo reads fast (tokenizers) tokenizers only"
        )
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type on malformed files
        raise CheckpointError(f"{path} is not a readable tokenizer.json ({exc})") from exc
    config: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {config_path}: {exc}") from exc
    template = config.get("chat_template")
    template_file = directory / "chat_template.jinja"
    if template is None and template_file.is_file():
        template = template_file.read_text()
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return LMTokenizer(
        backend=backend,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        pad_token=_token_text(config.get("pad_token")),
        chat_template=template,
        add_bos=bool(config.get("add_bos_token", False)),
        extra={"model_max_length": config.get("model_max_length", 8192)},
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level vocabularies)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tokenizer_from_gguf(meta: dict[str, Any]) -> LMTokenizer:
    """A byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`, model "gpt2")."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"GGUF tokenizer {kind!r} is not supported; duomo reads byte-level BPE ('gpt2') vocabularies"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _SPLIT_DIGITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    alphabet = set(_bytes_to_unicode().values())
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind_ in zip(tokens, types, strict=False)
        if int(kind_) == _GGUF_CONTROL and set(tok) <= alphabet  # others are llama.cpp mislabels
    ]
    backend.add_special_tokens(control)

    def special(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    return LMTokenizer(
        backend=backend,
        bos_token=special("bos_token_id"),
        eos_token=special("eos_token_id"),
        pad_token=special("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
