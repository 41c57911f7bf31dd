"""Text to images: tokenise, condition, sample with classifier-free guidance, decode.

A seed gives the same images whatever the batch size: image i of a call draws its initial noise and every
ancestral noise from its own generator seeded `seed + i` (`duomo.models.diffusion.samplers`), and the
denoiser sees each image's rows independently. Negative prompts replace the empty caption as the
unconditional branch of guidance, as in Stable Diffusion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from duomo.data.tokenizers import build_tokenizer
from duomo.errors import InputError
from duomo.limits import MAX_GENERATE_IMAGES, MAX_GENERATE_STEPS, MAX_PROMPT_CHARS
from duomo.models.clip.config import TextConfig
from duomo.models.diffusion.samplers import make_sampler, per_image_generators, sample
from duomo.models.diffusion.text_to_image import TextToImage
from duomo.tasks.diffusion.clip_guidance import clip_guided

StepCallback = Callable[[int, int], None]


@dataclass
class GenerateOptions:
    """One generation request's settings (None: the generator's own default)."""

    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    seed: int = 0
    eta: float = 0.0  # DDIM's stochasticity
    clip_guidance: float = 0.0  # scale of the CLIP-similarity gradient (needs a CLIP passed to generate)

    def resolved(self, model: TextToImage) -> GenerateOptions:
        """Defaults filled from the model's config, values checked."""
        cfg = model.config
        out = GenerateOptions(
            steps=cfg.steps if self.steps is None else self.steps,
            guidance=cfg.guidance if self.guidance is None else self.guidance,
            sampler=cfg.sampler if self.sampler is None else self.sampler,
            seed=self.seed,
            eta=self.eta,
            clip_guidance=self.clip_guidance,
        )
        if not isinstance(out.steps, int) or not 1 <= out.steps <= MAX_GENERATE_STEPS:
            raise InputError(f"steps must be a whole number in [1, {MAX_GENERATE_STEPS}], got {out.steps!r}")
        if not isinstance(out.guidance, int | float) or not 0 <= out.guidance <= 50:
            raise InputError(f"guidance must be a number in [0, 50], got {out.guidance!r}")
        if not isinstance(out.seed, int) or out.seed < 0:
            raise InputError(f"seed must be a whole number >= 0, got {out.seed!r}")
        make_sampler(out.sampler, model.noise_schedule)  # an unknown name fails here, with suggestions
        return out


def check_prompts(prompts: str | Sequence[str], name: str = "prompt") -> list[str]:
    """A list of non-empty prompts of bounded length."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise InputError(f"give at least one {name}")
    for text in items:
        if not isinstance(text, str):
            raise InputError(f"each {name} must be a string, got {type(text).__name__}")
        if len(text) > MAX_PROMPT_CHARS:
            raise InputError(f"a {name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return items


class PromptTokenizer:
    """texts -> token ids [B, context_length] padded with the generator's pad token (picklable for loaders).

    Every row gets the full context: the denoiser cross-attends to all columns, so trimming to the batch's
    longest text would make an image depend on the other prompts of its batch.
    """

    def __init__(self, text_cfg: TextConfig, pad_token_id: int | None = None) -> None:
        self.text_cfg, self.pad_token_id = text_cfg, pad_token_id
        self.tokenizer = build_tokenizer(text_cfg)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        context = self.text_cfg.context_length
        ids, pad = self.tokenizer.encode_with_padding(list(texts), context)
        extra = context - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, extra), value=0)
        pad = torch.nn.functional.pad(pad.bool(), (0, extra), value=True)
        if self.pad_token_id is not None:
            ids = ids.masked_fill(pad, self.pad_token_id)
        return ids


def tokenize(model: TextToImage, texts: list[str]) -> torch.Tensor:
    """Token ids [B, context_length] of texts for this generator."""
    return PromptTokenizer(model.config.text, model.config.pad_token_id)(texts)


@torch.no_grad()
def encode_prompts(
    model: TextToImage, texts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditioning (token states, pooled or None) of each text."""
    return model.condition(tokenize(model, texts).to(device))


def guided_denoiser(
    model: TextToImage,
    cond: tuple[torch.Tensor, torch.Tensor | None],
    uncond: tuple[torch.Tensor, torch.Tensor | None],
    guidance: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`denoise(x, t)` with classifier-free guidance, uncond + guidance * (cond - uncond), in one pass."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if guidance == 1.0:
            return model.denoise(x, t, cond[0].to(dtype), _cast(cond[1], dtype))
        states = torch.cat([uncond[0], cond[0]]).to(dtype)
        pooled = None if cond[1] is None else torch.cat([uncond[1], cond[1]]).to(dtype)
        t2 = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        out = model.denoise(torch.cat([x, x]), torch.cat([t2, t2]), states, pooled)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return denoise


def _cast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype)


def latent_shape(model: TextToImage) -> tuple[int, int, int]:
    """(C, H, W) of what the sampler works on: pixels, or the autoencoder's latents."""
    den = model.config.denoiser_config()
    size = model.config.image_size
    if model.autoencoder is not None:
        factor = 2 ** (len(model.autoencoder.config.block_out_channels) - 1)
        return model.autoencoder.config.latent_channels, size // factor, size // factor
    return den.in_channels, size, size


def autoencoder_decoder(model: TextToImage) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents -> pixels in [-1, 1] (differentiable), or None for a pixel-space generator."""
    vae = model.autoencoder
    if vae is None:
        return None
    return lambda z: vae.decode(z / vae.config.scaling_factor).clamp(-1, 1)


@torch.no_grad()
def clip_text_embeds(clip: torch.nn.Module, texts: list[str], device: torch.device) -> torch.Tensor:
    """Normalised embeddings of texts by a guiding CLIP."""
    tokens = build_tokenizer(clip.config.text)(texts)
    return clip.encode_text(tokens.to(device), normalize=True)


@torch.no_grad()
def decode(model: TextToImage, x: torch.Tensor) -> torch.Tensor:
    """Sampler output -> images [B, 3, H, W] in [0, 1]."""
    if model.autoencoder is not None:
        x = model.autoencoder.decode(x / model.autoencoder.config.scaling_factor)
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def generate_tensors(
    model: TextToImage,
    prompts: str | Sequence[str],
    n: int = 1,
    negative: str | Sequence[str] | None = None,
    options: GenerateOptions | None = None,
    batch_size: int = 16,
    on_step: StepCallback | None = None,
    clip: torch.nn.Module | None = None,
) -> torch.Tensor:
    """`n` images per prompt as a tensor [len(prompts) * n, 3, H, W] in [0, 1] (prompt-major order).

    With `options.clip_guidance` > 0 and a CLIP `clip`, sampling also follows the gradient of that CLIP's
    image-text similarity (`duomo.tasks.diffusion.clip_guidance`)."""
    texts = check_prompts(prompts)
    if not isinstance(n, int) or not 1 <= n <= MAX_GENERATE_IMAGES:
        raise InputError(f"n must be a whole number in [1, {MAX_GENERATE_IMAGES}], got {n!r}")
    if len(texts) * n > MAX_GENERATE_IMAGES:
        raise InputError(
            f"{len(texts)} prompts x {n} images exceed the limit of {MAX_GENERATE_IMAGES} images"
        )
    negatives = check_prompts(negative, "negative prompt") if negative is not None else [""]
    if len(negatives) not in (1, len(texts)):
        raise InputError(f"give one negative prompt or one per prompt ({len(texts)}), got {len(negatives)}")
    opts = (options or GenerateOptions()).resolved(model)
    if opts.clip_guidance and clip is None:
        raise InputError("clip_guidance needs a CLIP model to guide with (clip=...)")
    device = next(model.parameters()).device
    dtype = next(model.denoiser.parameters()).dtype
    rows = [p for p in texts for _ in range(n)]
    neg_rows = [
        negatives[0] if len(negatives) == 1 else negatives[i] for i in range(len(texts)) for _ in range(n)
    ]
    generators = per_image_generators(opts.seed, len(rows), device)
    shape = latent_shape(model)
    total = -(-len(rows) // batch_size) * opts.steps
    done = 0
    images = []
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        cond = encode_prompts(model, rows[chunk], device)
        uncond = encode_prompts(model, neg_rows[chunk], device)
        denoise = guided_denoiser(model, cond, uncond, float(opts.guidance))
        if opts.clip_guidance:
            denoise = clip_guided(
                denoise,
                model.noise_schedule,
                clip,
                clip_text_embeds(clip, rows[chunk], device),
                opts.clip_guidance,
                decode=autoencoder_decoder(model),
            )

        def step(i: int, steps: int, base: int = done) -> None:
            if on_step is not None:
                on_step(base + i + 1, total)

        x = sample(
            denoise,
            model.noise_schedule,
            opts.sampler,
            opts.steps,
            shape,
            generators[chunk],
            device=device,
            dtype=dtype,
            on_step=step,
            eta=opts.eta,
        )
        done += opts.steps
        images.append(decode(model, x))
    return torch.cat(images)
