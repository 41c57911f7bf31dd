"""Image and text embedding throughput: duomo vs open_clip vs transformers, same config, batch and machine.

Run: python bench/embed_throughput.py --model ViT-B-32 --batch 32 --repeats 5
All three models get the same random weights (duomo's, exported), so the comparison is like for like; the
libraries are timed interleaved (each round times each once), medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import duomo
from duomo.io import export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import open_clip
    from transformers import CLIPModel

    from duomo.tasks.clip.reference import openclip_model_from_export

    ours = duomo.create_model(args.model).eval()
    size = ours.config.vision.image_size
    images = torch.randn(args.batch, 3, size, size)
    tokens = open_clip.tokenize([f"a photo of a number {i} thing" for i in range(args.batch)])
    with tempfile.TemporaryDirectory() as tmp:
        oc = openclip_model_from_export(export(ours, Path(tmp) / "oc.safetensors", "openclip"))
        hf = CLIPModel.from_pretrained(
            str(export(ours, Path(tmp) / "hf", "hf")), attn_implementation="sdpa"
        ).eval()

    runners = {
        "duomo": (lambda: ours.encode_image(images), lambda: ours.encode_text(tokens)),
        "open_clip": (lambda: oc.encode_image(images), lambda: oc.encode_text(tokens)),
        "transformers": (
            lambda: hf.get_image_features(pixel_values=images),
            lambda: hf.get_text_features(input_ids=tokens),
        ),
    }
    # interleaved: every round times each library once, so a noisy moment of the machine hits all of them
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
    with torch.inference_mode():
        for img_fn, txt_fn in runners.values():  # warm-up
            img_fn(), txt_fn()
        for _ in range(args.repeats):
            for name, (img_fn, txt_fn) in runners.items():
                for fn, out in ((img_fn, times[name][0]), (txt_fn, times[name][1])):
                    start = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - start)
    rates = {
        name: (args.batch / statistics.median(img), args.batch / statistics.median(txt))
        for name, (img, txt) in times.items()
    }
    print(
        f"model {args.model}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, fp32 CPU"
    )
    print("| library | images/s | texts/s | duomo ÷ library (images) | duomo ÷ library (texts) |")
    print("|---|---|---|---|---|")
    base_img, base_txt = rates["duomo"]
    for name, (img, txt) in rates.items():
        print(f"| {name} | {img:.1f} | {txt:.1f} | {base_img / img:.2f} | {base_txt / txt:.2f} |")


if __name__ == "__main__":
    main()
