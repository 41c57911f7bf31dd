"""Sampling speed: duomo vs diffusers on the same small Stable Diffusion pipeline, in one run, interleaved.

A random SD 1.x-style pipeline (UNet 64-128-128 channels, 2 layers per stage, cross-attention at every stage;
VAE 32-64; CLIP text 4 layers x 256) is built and saved by diffusers; duomo reads that folder. Both make the
same images (prompt, seed, DDIM or DPM-Solver++, steps, guidance) alternately, `--rounds` times; the table
gives the median seconds per image and the ratio diffusers / duomo (> 1: duomo is faster).

    python bench/generate_speed.py --size 64 --steps 20 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine


def build(folder: Path, scheduler: str, size: int) -> Path:
    import diffusers
    import transformers

    from duomo.io.diffusers import write_tokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=size // 2,  # the VAE halves each side
        block_out_channels=[64, 128, 128],
        down_block_types=["CrossAttnDownBlock2D"] * 3,
        up_block_types=["CrossAttnUpBlock2D"] * 3,
        layers_per_block=2,
        cross_attention_dim=256,
        attention_head_dim=4,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
        )
    )
    write_tokenizer(folder / "tok", None, 77)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tok")
    cls = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler}[scheduler]
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (latents: size / 2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", type=int, default=2, help="images per call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sampler", choices=["ddim", "dpm"], default="dpm")
    parser.add_argument("--out", default="bench/results/generate_speed.json")
    args = parser.parse_args()

    import diffusers

    from duomo.io.diffusers import read_diffusers
    from duomo.models.diffusion.samplers import per_image_generators
    from duomo.tasks.diffusion.generate import GenerateOptions, generate_tensors

    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp), args.sampler, args.size)
        theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        theirs.set_progress_bar_config(disable=True)
        ours, _ = read_diffusers(folder)
    prompt = "a red circle"
    opts = GenerateOptions(steps=args.steps, guidance=7.5, seed=0, sampler=args.sampler)

    def run_ours() -> torch.Tensor:
        with torch.inference_mode():
            return generate_tensors(ours, [prompt], n=args.n, options=opts)

    def run_theirs() -> torch.Tensor:
        with torch.inference_mode():
            return theirs(
                [prompt] * args.n,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                generator=per_image_generators(0, args.n),
                output_type="pt",
            ).images

    diff = (run_ours() - run_theirs()).abs().max().item()  # warm-up, and the same images
    times: dict[str, list[float]] = {"duomo": [], "diffusers": []}
    for _ in range(args.rounds):
        for name, fn in (("duomo", run_ours), ("diffusers", run_theirs)):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / args.n)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": machine(),
        "args": vars(args),
        "max_abs_diff": diff,
        "seconds_per_image": med,
        "ratio_diffusers_over_duomo": med["diffusers"] / med["duomo"],
        "runs": times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"same images: max abs diff {diff:.2e}")
    print("| sampler | size | steps | duomo s/image | diffusers s/image | diffusers / duomo |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.sampler} | {args.size} | {args.steps} | {med['duomo']:.3f} | {med['diffusers']:.3f} "
        f"| {result['ratio_diffusers_over_duomo']:.2f} |"
    )


if __name__ == "__main__":
    main()
