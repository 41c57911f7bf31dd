"""How good are generated images? Compositional accuracy on the shapes world, CLIP score, Fréchet distance.

For every colour-shape pair of the shapes world, generate N images of "a {colour} {shape}" and judge each
twice: with the shipped shapes CLIP (zero-shot among all 64 pair names) and with a pixel colour check. Pairs
are split into those seen in the generator's training captions and the held-out ones (never in them). The
judge's own accuracy on real rendered images of the same pairs is printed beside it: the ceiling.
Then CLIP score (torchmetrics' definition) and the Fréchet distance between generated and real images in the
judge's image-feature space, across guidance scales, samplers and step counts; and CLIP guidance vs plain
classifier-free guidance on the held-out pairs (guided by another CLIP, shapes-minilm-xl, than the judge).

    python bench/generate_quality.py --model shapes-gen --n 8 --out bench/results/generate_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import duomo
from duomo.data.shapes import COLOURS, EVAL_TEMPLATES, ShapesDataset, all_pairs, heldout_pairs
from duomo.tasks.clip.zero_shot import build_classifier
from duomo.tasks.diffusion.generate import GenerateOptions, generate_tensors
from duomo.tasks.diffusion.quality import clip_score, dominant_colour, frechet_distance, reframe_close_ups


@dataclass
class Judge:
    """A CLIP judging images among the pair names of `classifier`; "object" close-ups are reframed first."""

    clip: duomo.Pipeline
    classifier: torch.Tensor
    framing: str = "scene"

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted pair index per image, image embeddings) for images [N, 3, H, W] in [0, 1]."""
        vision = self.clip.config.vision
        size = vision.image_size
        if self.framing == "object":
            x = reframe_close_ups(images, size)
        else:
            x = torch.nn.functional.interpolate(
                images, size=(size, size), mode="bilinear", align_corners=False
            )
        mean = torch.tensor(vision.mean).view(1, 3, 1, 1)
        std = torch.tensor(vision.std).view(1, 3, 1, 1)
        embeds = self.clip.encode_pixels((x - mean) / std)
        return (embeds @ self.classifier.T).argmax(1), embeds


def real_images(
    pairs: list[tuple[str, str]], n: int, size: int, framing: str = "scene"
) -> dict[tuple[str, str], torch.Tensor]:
    """n rendered single-object images per pair (from the split holding it), [n, 3, size, size] in [0, 1]."""
    held = heldout_pairs()
    out: dict[tuple[str, str], list[torch.Tensor]] = {p: [] for p in pairs}
    for split in ("val", "heldout"):
        data = ShapesDataset(split, size=40 * 64 * n, image_size=size, seed=7, framing=framing)
        for i in range(len(data)):
            scene = data.scene(i)
            pair = (scene.main.colour, scene.main.shape)
            if pair in out and len(out[pair]) < n and (pair in held) == (split == "heldout"):
                img = np.array(data[i]["image"])
                out[pair].append(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
            if all(len(v) >= n for v in out.values()):
                break
    return {p: torch.stack(v) for p, v in out.items() if v}


def score(
    images: dict[tuple[str, str], torch.Tensor], judge: Judge, names: list[str]
) -> dict[str, dict[str, float]]:
    """Right colour / shape / pair (CLIP judge) and right colour (pixels), for seen and held-out pairs."""
    held = heldout_pairs()
    tallies = {"seen": [], "heldout": []}
    for pair, batch in images.items():
        pred, _ = judge(batch)
        for i, p in enumerate(pred.tolist()):
            colour, shape = names[p].split()
            pixel = dominant_colour(batch[i], COLOURS)
            tallies["heldout" if pair in held else "seen"].append(
                (colour == pair[0], shape == pair[1], (colour, shape) == pair, pixel == pair[0])
            )
    out = {}
    for group, rows in tallies.items():
        if not rows:  # e.g. CLIP guidance is measured on held-out pairs only
            continue
        arr = np.array(rows, dtype=float)
        out[group] = {
            "images": len(rows),
            "colour": float(arr[:, 0].mean()),
            "shape": float(arr[:, 1].mean()),
            "pair": float(arr[:, 2].mean()),
            "pixel_colour": float(arr[:, 3].mean()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="shapes-gen")
    parser.add_argument("--judge", default="shapes-minilm")
    parser.add_argument("--guide", default="shapes-minilm-xl", help="the CLIP that CLIP guidance follows")
    parser.add_argument("--n", type=int, default=8, help="images per pair")
    parser.add_argument("--sweep-n", type=int, default=4, help="images per pair in the sweeps")
    parser.add_argument("--out", default="bench/results/generate_quality.json")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweeps and CLIP guidance")
    parser.add_argument(
        "--framing",
        default=None,
        help="real images as the generator was trained: scene or object "
        "(default: what the generator records, else scene)",
    )
    parser.add_argument(
        "--no-settings-sweep", action="store_true", help="skip the guidance/sampler/steps sweep only"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    gen = duomo.load(args.model)
    clip = duomo.load(args.judge)
    pairs = all_pairs()
    names = [f"{c} {s}" for c, s in pairs]
    classifier = build_classifier(names, list(EVAL_TEMPLATES), clip.encode_text)
    held = heldout_pairs()
    print(f"generator {args.model}, judge {args.judge}: {len(pairs)} pairs, {len(held)} held out")

    def generate(pair_list: list[tuple[str, str]], n: int, **kw) -> tuple[dict, float]:
        start = time.perf_counter()
        prompts = [f"a {c} {s}" for c, s in pair_list]
        images = gen.generate_tensors(prompts, n=n, seed=0, batch_size=64, **kw)
        seconds = time.perf_counter() - start
        return {p: images[i * n : (i + 1) * n] for i, p in enumerate(pair_list)}, seconds

    framing = args.framing or ("object" if gen.meta.get("data") == "shapes-objects" else "scene")
    judge = Judge(clip, classifier, framing)
    real = real_images(pairs, args.n, gen.image_size, framing)
    result = {"model": args.model, "judge": args.judge, "n_per_pair": args.n, "framing": framing}
    result["real"] = score(real, judge, names)
    print("judge on real images:", json.dumps(result["real"]))
    images, seconds = generate(pairs, args.n)
    result["default"] = score(images, judge, names)
    result["default"]["seconds"] = seconds
    print("generated (model defaults):", json.dumps(result["default"]))

    real_feats = {pair: judge(batch)[1] for pair, batch in real.items()}  # the same for every setting
    prompt_embeds = {pair: clip.encode_text([f"a {pair[0]} {pair[1]}"]) for pair in pairs}

    def clip_metrics(images: dict) -> tuple[float, float]:
        gen_feats, txt, reals = [], [], []
        for pair, batch in images.items():
            gen_feats.append(judge(batch)[1])
            txt.append(prompt_embeds[pair].expand(len(batch), -1))
            reals.append(real_feats[pair])
        g, r = torch.cat(gen_feats), torch.cat(reals)
        return clip_score(g, torch.cat(txt)), frechet_distance(g.numpy(), r.numpy())

    cs, fd = clip_metrics(images)
    result["default"].update({"clip_score": cs, "frechet": fd})
    print(f"CLIP score {cs:.2f}, Fréchet distance {fd:.4f}")

    if not args.no_sweep:
        sweep = []
        held_pairs = [p for p in pairs if p in held]
        settings = [{"guidance": g} for g in (1.0, 2.0, 3.0, 5.0, 8.0)]
        settings += [{"sampler": s, "steps": k} for s in ("dpm", "ddim", "euler_a") for k in (10, 25, 50)]
        for kw in [] if args.no_settings_sweep else settings:
            images, seconds = generate(pairs, args.sweep_n, **kw)
            row = {**kw, **score(images, judge, names)}
            row["clip_score"], row["frechet"] = clip_metrics(images)
            row["seconds"] = seconds
            sweep.append(row)
            print(json.dumps(row))
        result["sweep"] = sweep
        guide = duomo.load(args.guide).model  # not the judge: a guide that optimises its judge proves nothing
        guidance_rows = []
        for scale in (0.0, 50.0, 200.0):
            start = time.perf_counter()
            prompts = [f"a {c} {s}" for c, s in held_pairs]
            options = GenerateOptions(clip_guidance=scale, seed=0)
            tensors = generate_tensors(gen.model, prompts, args.sweep_n, None, options, 64, None, guide)
            imgs = {p: tensors[i * args.sweep_n : (i + 1) * args.sweep_n] for i, p in enumerate(held_pairs)}
            row = {"clip_guidance": scale, **score(imgs, judge, names)}
            row["seconds"] = time.perf_counter() - start
            guidance_rows.append(row)
            print(json.dumps(row))
        result["clip_guidance"] = guidance_rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
