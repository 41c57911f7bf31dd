"""Python API for chat models: images and text in, text out (whole, or streamed piece by piece).

    bot = duomo.load("shapes-chat")      # shipped; a `duomo train --task chat` folder; a LLaVA directory
    bot.ask("star.png", "what colour is the star?")                  # -> "purple"
    for piece in bot.stream([{"role": "user", "content": "<image>\\nDescribe it."}], images=["star.png"]):
        print(piece, end="")
    bot.chat(messages, images, DecodeSettings(...)) -> Completion (text, tokens, finish_reason)

Messages are [{"role": "system"|"user"|"assistant", "content": str}], an "<image>" in a user turn for each
image, in order. A language model alone (`duomo.load("smollm2")`, a GGUF file) answers text-only messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from duomo.data.conversations import IMAGE_PLACEHOLDER, check_turns
from duomo.data.images import load_image
from duomo.data.tokenizers.lm import LMTokenizer
from duomo.data.transforms import image_transform
from duomo.errors import InputError
from duomo.models.lm.model import CausalLM, LMCache
from duomo.models.lm.vlm import VisionLanguageModel
from duomo.tasks.lm.chat_data import encode_conversation
from duomo.tasks.lm.decode import Completion, DecodeSettings, decode_stream, last_completion

MAX_IMAGES = 8  # images in one conversation


class ChatPipeline:
    """A chat model (vision-language, or a language model alone) on a device, with its tokenizer."""

    def __init__(
        self,
        model: VisionLanguageModel | CausalLM,
        tokenizer: LMTokenizer,
        device: torch.device,
        name: str = "",
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.meta = meta or {}
        self.system = self.meta.get("system")
        self.vision = isinstance(model, VisionLanguageModel)
        self.lm: CausalLM = model.lm if isinstance(model, VisionLanguageModel) else model
        if self.vision:
            v = model.config.vision
            self.transform = image_transform(v.image_size, v.mean, v.std, train=False)
        ends = {tokenizer.eos_token_id, tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")}
        self.end_ids = tuple(sorted(i for i in ends if i is not None))

    @property
    def context_length(self) -> int:
        return self.lm.config.max_positions

    def prepare(
        self, messages: Sequence[dict[str, str]], images: Sequence[Any] = ()
    ) -> tuple[list[int], LMCache, torch.Tensor, int]:
        """A conversation through the model, ready to decode its next reply: (prompt ids without image
        placeholders, the filled cache, the last logits, the prompt's length in positions)."""
        if not messages:
            raise InputError("the message list is empty")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                role = m.get("role") if isinstance(m, dict) else m
                raise InputError(f"unknown role {role!r}; use system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise InputError("every message needs text content")
            turns.append((m["role"], m["content"]))
        if len(images) > MAX_IMAGES:
            raise InputError(f"{len(images)} images; at most {MAX_IMAGES} per conversation")
        placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
        if images and not self.vision:
            raise InputError(f"{self.name or 'this model'} is a language model alone: it cannot read images")
        if placeholders != len(images):
            check_turns(turns + [("assistant", "")], len(images))  # the one clear message about the mismatch
        pixels = None
        if self.vision and images:
            pixels = torch.stack([self.transform(load_image(im)) for im in images]).to(self.device)
        image_id = self.model.config.image_token_id if self.vision else -1
        per = self.model.config.tokens_per_image if self.vision else 0
        ids, _ = encode_conversation(
            self.tokenizer, messages, image_id, per, self.system, generation_prompt=True
        )
        if len(ids) >= self.context_length:
            raise InputError(
                f"the conversation is {len(ids)} tokens; this model reads at most {self.context_length}"
            )
        batch = torch.tensor([ids], device=self.device)
        cache = self.lm.new_cache()
        with torch.inference_mode():
            if self.vision:
                logits = self.model.prefill(batch, pixels, cache)
            else:
                logits = self.lm(batch, cache=cache, last_only=True)[0, -1]
        return [i for i in ids if i != image_id], cache, logits, len(ids)

    def stream(
        self,
        messages: Sequence[dict[str, str]],
        images: Sequence[Any] = (),
        settings: DecodeSettings | None = None,
    ) -> Iterator[str | Completion]:
        """Text pieces of the reply as they are decoded, then the `Completion`."""
        ids, cache, logits, length = self.prepare(messages, images)
        settings = settings or DecodeSettings()
        return decode_stream(
            self.lm, self.tokenizer, ids, settings, None, self.end_ids, (cache, logits, length)
        )

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        images: Sequence[Any] = (),
        settings: DecodeSettings | None = None,
    ) -> Completion:
        """The whole reply."""
        return last_completion(self.stream(messages, images, settings))

    def ask(self, image: Any | None, question: str, **settings: Any) -> str:
        """One question about one image (or none): the answer text."""
        content = f"{IMAGE_PLACEHOLDER}\n{question}" if image is not None else question
        images = [image] if image is not None else []
        return self.chat(
            [{"role": "user", "content": content}], images, DecodeSettings(**settings)
        ).text.strip()


def load_chat_pipeline(name: str | Path, device: torch.device) -> ChatPipeline:
    """A chat folder, a LLaVA directory, or a language model (name, GGUF, transformers directory)."""
    from duomo.io.chat import is_chat_dir, load_chat, read_lm
    from duomo.io.llava import is_llava_dir, read_llava
    from duomo.io.resolve import WEIGHTS_DIR

    shipped = WEIGHTS_DIR / str(name)
    if is_chat_dir(shipped) or is_chat_dir(name):
        model, tokenizer, meta = load_chat(shipped if is_chat_dir(shipped) else name)
        return ChatPipeline(model, tokenizer, device, str(name), meta)
    if is_llava_dir(name):
        model, tokenizer = read_llava(name)
        if tokenizer is None:
            raise InputError(f"{name} has no tokenizer.json; a chat model needs one")
        return ChatPipeline(model, tokenizer, device, str(name))
    lm, tokenizer = read_lm(name)
    if tokenizer is None:
        raise InputError(f"{name} has no tokenizer.json; a chat model needs one")
    return ChatPipeline(lm, tokenizer, device, str(name))


def is_chat_model(name: str | Path) -> bool:
    """True for names `load_chat_pipeline` reads (chat folders, LLaVA, language models)."""
    from duomo.io.chat import PACKAGED_LMS, is_chat_dir
    from duomo.io.llava import is_llava_dir
    from duomo.io.lm import is_lm_dir
    from duomo.io.resolve import WEIGHTS_DIR

    text = str(name)
    return (
        text in PACKAGED_LMS
        or text.endswith(".gguf")
        or is_chat_dir(WEIGHTS_DIR / text)
        or is_chat_dir(text)
        or is_llava_dir(text)
        or is_lm_dir(text)
    )
