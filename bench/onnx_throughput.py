"""Image embedding throughput of duomo fp32, duomo on ONNX Runtime fp32 and int8, against open_clip fp32:
ViT-B-32 (random weights, the same in every arm), interleaved A/B/C/D rounds in one process; images/s as
ratios to open_clip, and the int8 path's cosine to fp32.

    python bench/onnx_throughput.py --model ViT-B-32 --batches 1 32 --rounds 5 \
        --json bench/results/onnx_throughput.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_json  # noqa: E402

import duomo  # noqa: E402
from duomo.io import export  # noqa: E402
from duomo.io.onnx import OnnxCLIP, cosine_check, export_onnx, quantize_onnx  # noqa: E402


def seconds(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    ours = duomo.create_model(args.model).eval()
    size = ours.config.vision.image_size
    folder = Path(tempfile.mkdtemp())
    fp32 = OnnxCLIP(export_onnx(ours, folder / "fp32"))
    int8 = OnnxCLIP(quantize_onnx(folder / "fp32", folder / "int8"))
    arms = {"duomo fp32": ours, "onnxruntime fp32": fp32, "onnxruntime int8": int8}
    try:
        from duomo.tasks.clip.reference import openclip_model_from_export

        arms["open_clip fp32"] = openclip_model_from_export(
            export(ours, folder / "oc.safetensors", "openclip")
        )
    except ImportError:
        pass
    quality = cosine_check(ours, int8, torch.randn(64, 3, size, size))
    rows = []
    for batch in args.batches:
        images = torch.randn(batch, 3, size, size)
        runs: dict[str, list[float]] = {name: [] for name in arms}
        with torch.no_grad():
            for model in arms.values():
                model.encode_image(images)  # warm-up
            for _ in range(args.rounds):
                for name, model in arms.items():
                    runs[name].append(batch / seconds(lambda m=model, x=images: m.encode_image(x)))
        medians = {name: statistics.median(v) for name, v in runs.items()}
        rows.append({"batch": batch, "images_per_s": medians, "runs": runs})
    ref = "open_clip fp32"
    print(
        f"int8 cosine to fp32 on {int(quality['images'])} random images: min {quality['min_cosine']:.5f}, "
        f"mean {quality['mean_cosine']:.5f}"
    )
    print("| path | batch | images/s | x open_clip |")
    print("|---|---|---|---|")
    for row in rows:
        for name, value in row["images_per_s"].items():
            base = row["images_per_s"].get(ref)
            print(f"| {name} | {row['batch']} | {value:.1f} | {value / base if base else float('nan'):.2f} |")
    if args.json:
        write_json(args.json, vars(args), rows, quality)


if __name__ == "__main__":
    main()
