"""Decoding a causal LM: greedy or sampled (temperature, top-k, top-p, seeded), repetition penalty, stop
strings, a token budget, and text streamed piece by piece as it is decoded.

The choice of the next token is `pick` (one row's logits -> id), shared by single-prompt decoding here and the
server's batched decoder, so both give the same tokens for the same settings and seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from duomo.errors import InputError
from duomo.models.lm.model import CausalLM, LMCache


@dataclass
class DecodeSettings:
    """How to choose tokens and when to stop."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 10:
            raise InputError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.repetition_penalty <= 10:
            raise InputError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        self.stop = tuple(s for s in self.stop if s)

    def generator(self) -> torch.Generator | None:
        """The random stream of one request (None when greedy)."""
        if self.temperature == 0:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return gen


def pick(
    logits: torch.Tensor, history: list[int], settings: DecodeSettings, generator: torch.Generator | None
) -> int:
    """The next token from one row's logits [vocab], in transformers' order: repetition penalty, then
    temperature, top-k, top-p; greedy when temperature is 0."""
    scores = logits.float().clone()
    if settings.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=scores.device)
        s = scores[seen]
        scores[seen] = torch.where(s < 0, s * settings.repetition_penalty, s / settings.repetition_penalty)
    if settings.temperature == 0:
        return int(scores.argmax())
    scores = scores / settings.temperature
    if settings.top_k and settings.top_k < scores.numel():
        kth = torch.topk(scores, settings.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, index = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - settings.top_p
        drop[-1] = False  # the most likely token always stays
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, index, drop), float("-inf"))
    probs = scores.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TextStream:
    """Turns generated ids into text pieces: holds back an incomplete UTF-8 character and any tail that could
    still become a stop string; `stopped` once a stop string appears (the text before it is kept)."""

    tokenizer: object | None  # None: tokens only (no text)
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters already given out
    stopped: bool = False

    def text(self) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(self.ids)

    def push(self, token: int) -> str:
        """Add one token; the new text that is safe to show."""
        self.ids.append(token)
        text = self.text()
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped = True
                piece, self.sent = text[self.sent : at], max(self.sent, at)
                return piece
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1  # an incomplete multi-byte character
        for s in self.stop:  # a tail that is the start of a stop string waits
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        piece = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return piece

    def final_text(self) -> str:
        """The whole reply, cut before the first stop string."""
        text = self.text()
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def finish(self) -> str:
        """What was held back, at the end (unless a stop string cut it)."""
        if self.stopped:
            return ""
        text = self.text()
        piece = text[self.sent :]
        self.sent = len(text)
        return piece


@dataclass
class Completion:
    """The outcome of one decode: the tokens, the text, why it ended ("stop" or "length")."""

    tokens: list[int]
    text: str
    finish_reason: str


def decode_stream(
    model: CausalLM,
    tokenizer: object | None,
    prompt_ids: list[int] | None,
    settings: DecodeSettings,
    embeds: torch.Tensor | None = None,
    end_ids: tuple[int, ...] = (),
    prefilled: tuple[LMCache, torch.Tensor, int] | None = None,
) -> Iterator[str | Completion]:
    """Decode one prompt (token ids, or input embeddings [1, T, width] when images are in it), yielding text
    pieces as they are safe to show and, last, the `Completion`."""
    device = model.embed_tokens.weight.device
    limit = model.config.max_positions
    if prefilled is None:
        if embeds is None:
            if not prompt_ids:
                raise InputError("the prompt is empty")
            embeds = model.embed(torch.tensor([prompt_ids], device=device))
        length = embeds.shape[1]
    else:  # the prompt already went through the model (a vision-language model's prefill)
        length = prefilled[2]
    if length >= limit:
        raise InputError(f"the prompt is {length} tokens; this model reads at most {limit}")
    generator = settings.generator()
    history = list(prompt_ids or [])
    stream = TextStream(tokenizer, settings.stop)
    finish = "length"
    with torch.inference_mode():
        if prefilled is None:
            cache: LMCache = model.new_cache()
            logits = model(embeds=embeds, cache=cache, last_only=True)[0, -1]
        else:
            cache, logits, _ = prefilled
        for _ in range(min(settings.max_tokens, limit - length)):
            token = pick(logits, history, settings, generator)
            if token in end_ids:
                finish = "stop"
                break
            history.append(token)
            piece = stream.push(token)
            if piece:
                yield piece
            if stream.stopped:
                finish = "stop"
                break
            logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    tail = stream.finish()
    if tail:
        yield tail
    yield Completion(stream.ids, stream.final_text(), finish)


def complete(
    model: CausalLM,
    tokenizer: object | None,
    prompt_ids: list[int] | None,
    settings: DecodeSettings,
    embeds: torch.Tensor | None = None,
    end_ids: tuple[int, ...] = (),
) -> Completion:
    """Decode to the end and return the `Completion`."""
    return last_completion(decode_stream(model, tokenizer, prompt_ids, settings, embeds, end_ids))


def last_completion(items: Iterator[str | Completion]) -> Completion:
    """Run a decode stream to its end; its final item, the `Completion`."""
    result = None
    for item in items:
        if isinstance(item, Completion):
            result = item
    if result is None:
        raise RuntimeError("the decode stream ended without a Completion")
    return result
