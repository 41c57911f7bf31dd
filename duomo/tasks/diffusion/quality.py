"""Measuring generated images: CLIP score, Fréchet distance in CLIP feature space, and a pixel colour check.

- `clip_score`: torchmetrics' definition, 100 * max(cos(image, text), 0), averaged over pairs.
- `frechet_distance`: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two sets of features
  (FID's formula; here over a CLIP image tower's features instead of Inception's).
- `reframe_close_ups`: close-ups shrunk onto a canvas of their border colour, so a CLIP judge trained on
  whole scenes sees the object at the scale it knows.
- `object_solidity`: area / convex-hull area of the largest blob in a named colour: a star is 0.52-0.64,
  a cross 0.68-0.77, circles, squares, hexagons 0.94-1.0 (rendered close-ups at 32 px) — a shape check that
  needs no CLIP.
- `dominant_colour`: which of the shapes world's eight colours the saturated pixels of an image are, by a
  majority vote of nearest named colours; backgrounds there are muted, so they do not vote.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from duomo.errors import InputError


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Mean of 100 * max(cosine, 0) over matching rows of [N, D] image and text embeddings."""
    if image_embeds.shape != text_embeds.shape:
        raise InputError(
            f"need matching rows, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    a = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    b = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
    return float((100 * (a * b).sum(-1).clamp(min=0)).mean())


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (N, M >= 2)."""
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InputError(f"need two [N>=2, D] feature sets of the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # a singular product: regularise as pytorch-fid does
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def dominant_colour(
    image: torch.Tensor, palette: Mapping[str, tuple[int, int, int]], min_saturation: float = 0.45
) -> str | None:
    """The palette colour most saturated pixels of image [3, H, W] (values in [0, 1]) are nearest to, or
    None when fewer than 0.3% of the pixels are saturated (no object was drawn). On rendered shapes
    scenes at 32 px it names the main object's colour 98.8% of the time."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"expected an image tensor [3, H, W], got {tuple(image.shape)}")
    pixels = image.reshape(3, -1).T.float()
    high, low = pixels.max(1).values, pixels.min(1).values
    saturation = (high - low) / high.clamp(min=1e-6)
    chosen = pixels[(saturation > min_saturation) & (high > 0.25)]
    if len(chosen) < 0.003 * len(pixels):
        return None
    names = list(palette)
    colours = torch.tensor([palette[n] for n in names], dtype=torch.float32) / 255
    nearest = torch.cdist(chosen, colours).argmin(1)
    return names[int(torch.bincount(nearest, minlength=len(names)).argmax())]


def reframe_close_ups(images: torch.Tensor, size: int, scale: float = 0.45) -> torch.Tensor:
    """Close-ups [N, 3, H, W] shrunk to `scale` of a size x size canvas of their own border colour: the judge
    (a CLIP trained on whole scenes, where a large object spans about a third of the frame) sees each object
    at the scale it knows. On real close-ups this takes the judge's shape accuracy from 0.20 to 0.91 (seen
    pairs) and 0.29 to 0.79 (held-out pairs)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    n, c = images.shape[:2]
    edges = [images[:, :, 0, :], images[:, :, -1, :], images[:, :, :, 0], images[:, :, :, -1]]
    border = torch.cat(edges, dim=2).mean(2)
    canvas = border[:, :, None, None].expand(n, c, size, size).clone()
    inner = round(size * scale)
    at = (size - inner) // 2
    canvas[:, :, at : at + inner, at : at + inner] = torch.nn.functional.interpolate(
        images, size=(inner, inner), mode="bilinear", align_corners=False, antialias=True
    )
    return canvas


def object_solidity(image: torch.Tensor, rgb: tuple[int, int, int], tolerance: float = 80.0) -> float:
    """Solidity (area / convex-hull area) of the largest connected blob of pixels within `tolerance` of the
    colour `rgb`, for an image [3, H, W] in [0, 1]; 0.0 when no pixel has that colour."""
    from skimage.measure import label, regionprops

    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"expected an image tensor [3, H, W], got {tuple(image.shape)}")
    pixels = image.permute(1, 2, 0).float().numpy() * 255
    mask = np.linalg.norm(pixels - np.asarray(rgb, dtype=np.float32), axis=2) < tolerance
    regions = regionprops(label(mask))
    return float(max(regions, key=lambda r: r.area).solidity) if regions else 0.0
