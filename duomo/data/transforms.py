"""CLIP image preprocessing, tensor-for-tensor identical to OpenCLIP's image_transform.

Eval: resize the shortest side to image_size (bicubic), center-crop a square, convert to RGB, scale to [0, 1],
normalize. Train: a RandomResizedCrop covering 90-100% of the area replaces resize + crop. As in OpenCLIP the
resize runs in the image's own mode and RGB conversion comes after it, so any PIL image gives the same tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from duomo.data.images import ImageLike, load_image, to_rgb
from duomo.errors import ImageError, InputError
from duomo.limits import MAX_ASPECT_RATIO

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's, = open_clip.OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_RESIZE_MODES = ("shortest", "squash")
_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect range, which OpenCLIP keeps


class ImageTransform:
    """PIL image -> normalized FloatTensor[3, size, size], exactly as OpenCLIP's eval (or train) transform."""

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        crop_scale: tuple[float, float] | None = None,
    ) -> None:
        """Set up the transform; crop_scale=(lo, hi) makes it a random-resized-crop train transform."""
        if not isinstance(image_size, int) or image_size <= 0:
            raise InputError(f"image_size must be a positive int, got {image_size!r}")
        if interpolation not in _INTERPOLATIONS:
            raise InputError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}")
        if resize_mode not in _RESIZE_MODES:
            raise InputError(f"resize_mode must be one of {list(_RESIZE_MODES)}, got {resize_mode!r}")
        if len(mean) != 3 or len(std) != 3:
            raise InputError(f"mean and std need 3 values (R, G, B), got {list(mean)} and {list(std)}")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.crop_scale = None if crop_scale is None else (float(crop_scale[0]), float(crop_scale[1]))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Resize + crop in the image's own mode, then RGB, ToTensor and Normalize."""
        if not isinstance(img, Image.Image):
            raise InputError(
                f"ImageTransform takes a PIL image, got {type(img).__name__}; "
                "use load_image or preprocess_images for paths and bytes"
            )
        # torchvision is imported here, not at module level: it costs seconds that most commands never need
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode, RandomResizedCrop

        size, mode = self.image_size, InterpolationMode(self.interpolation)
        check_aspect(img)
        if self.crop_scale is not None:
            # OpenCLIP's train transform always crops with bicubic, whatever the eval interpolation
            top, left, h, w = RandomResizedCrop.get_params(img, list(self.crop_scale), list(_RATIO))
            img = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
        elif self.resize_mode == "squash":
            img = TF.resize(img, [size, size], interpolation=mode)
        else:
            img = TF.center_crop(TF.resize(img, size, interpolation=mode), [size, size])
        x = TF.to_tensor(to_rgb(img))
        return TF.normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        """The settings, one line."""
        kind = (
            f"train, crop_scale={self.crop_scale}" if self.crop_scale else f"resize_mode={self.resize_mode!r}"
        )
        return f"ImageTransform(image_size={self.image_size}, interpolation={self.interpolation!r}, {kind})"


def check_aspect(img: Image.Image) -> None:
    """Refuse an image too thin to resize: scaling its shortest side up to the model's size would make it
    `aspect` times as long as wide (a 200000x1 PNG of 275 bytes would become 12.8M x 64 pixels, gigabytes,
    before the crop). The bound is on the work, so it holds whatever the image's orientation."""
    short, long = sorted(img.size)
    if short < 1 or long > MAX_ASPECT_RATIO * short:
        raise ImageError(
            f"image is {img.width}x{img.height}: longer than {MAX_ASPECT_RATIO}:1, too thin to resize and "
            "center-crop; crop it to the part that matters first"
        )


def image_transform(
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train: bool = False,
) -> ImageTransform:
    """OpenCLIP's image_transform: the eval transform, or with train=True a RandomResizedCrop(0.9-1.0) one."""
    return ImageTransform(image_size, mean, std, crop_scale=(0.9, 1.0) if train else None)


def preprocess_images(
    images: Sequence[ImageLike], transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """Load each image (path, bytes, data URL, PIL...) with load_image; the transformed batch [N, 3, H, W]."""
    if isinstance(images, (str, bytes, Image.Image)) or not isinstance(images, Sequence):
        raise InputError(f"preprocess_images takes a sequence of images, got {type(images).__name__}")
    if len(images) == 0:
        raise InputError("preprocess_images got no images; pass at least one")
    return torch.stack([transform(load_image(image)) for image in images])
