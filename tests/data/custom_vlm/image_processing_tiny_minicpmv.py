"""Image processor of the tiny MiniCPM-V look-alike (AutoImageProcessor, custom code).

As the real MiniCPM-V's slice mode: an image larger than `scale_resolution`² is cut into a
grid of at most `max_slice_nums` crops, chosen to match its aspect ratio; the model sees the
whole image (the "source") and then every crop. Unlike the real one, every crop is resized
to the vision tower's fixed `image_size` square, so all crops have the same grid of patches.
Pure torch: a PIL image is read through `tobytes()`, no PIL import is needed here.
"""

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.image_processing_base import BatchFeature, ImageProcessingMixin

IM_START, IM_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
UNK = "<unk>"


def to_tensor(image):
    """A PIL image (any mode) or a [3, H, W] tensor -> float [3, H, W] in [0, 1]."""
    if isinstance(image, torch.Tensor):
        x = image.detach().to("cpu")
        return x.float() / 255.0 if not x.is_floating_point() else x.float()
    rgb = image.convert("RGB")
    w, h = rgb.size
    x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return x.permute(2, 0, 1).float() / 255.0


def get_sliced_grid(size, max_slice_nums, scale_resolution):
    """(cols, rows) of the crop grid for an image of `size` (width, height), or None: the
    real MiniCPM-V's choice (the grid count near the area ratio, aspect closest in log)."""
    width, height = size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    candidates = [n for n in (multiple - 1, multiple, multiple + 1) if 1 < n <= max_slice_nums]
    best, best_error = None, float("inf")
    for n in candidates:
        for cols in range(1, n + 1):
            if n % cols == 0:
                error = abs(log_ratio - math.log(cols / (n // cols)))
                if error < best_error:
                    best, best_error = (cols, n // cols), error
    return best


class TinyMiniCPMVImageProcessor(ImageProcessingMixin):
    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(
        self,
        image_size=28,
        patch_size=14,
        query_num=4,
        slice_mode=True,
        max_slice_nums=4,
        scale_resolution=28,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.query_num = query_num
        self.slice_mode = slice_mode
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    @classmethod
    def from_model_config(cls, config):
        """The processor a model `config` implies (what `chat` uses without a processor)."""
        return cls(
            image_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size,
            query_num=config.query_num,
            slice_mode=config.slice_mode,
            max_slice_nums=config.max_slice_nums,
            scale_resolution=config.scale_resolution,
        )

    def grid(self, image):
        """(cols, rows) of an image's crops, or None when it is not sliced."""
        if not self.slice_mode:
            return None
        size = (image.shape[2], image.shape[1]) if isinstance(image, torch.Tensor) else image.size
        return get_sliced_grid(size, self.max_slice_nums, self.scale_resolution)

    def crops(self, image):
        """[1 + cols * rows, 3, H, W] unresized: the whole image, then the crops row-major."""
        x = to_tensor(image)
        grid = self.grid(image)
        out = [x]
        if grid is not None:
            cols, rows = grid
            _, h, w = x.shape
            for r in range(rows):
                for c in range(cols):
                    top, bottom = r * h // rows, (r + 1) * h // rows
                    left, right = c * w // cols, (c + 1) * w // cols
                    out.append(x[:, top:bottom, left:right])
        return out

    def preprocess(self, images, return_tensors="pt", **kwargs):
        """pixel_values [N, 3, S, S] (every crop of every image, in order), num_crops per image."""
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        size = (self.image_size, self.image_size)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        pixels, counts = [], []
        for image in images:
            crops = self.crops(image)
            counts.append(len(crops))
            for crop in crops:
                crop = F.interpolate(crop[None], size=size, mode="bilinear", antialias=True)[0]
                pixels.append((crop.clamp(0, 1) - mean) / std)
        pixel_values = torch.stack(pixels) if pixels else torch.zeros(0, 3, *size)
        return BatchFeature({"pixel_values": pixel_values, "num_crops": counts})

    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)

    def get_slice_image_placeholder(self, image):
        """The text standing for `image`: `<image>` + query_num `<unk>` + `</image>` for the
        whole image, then (sliced) `<slice>` + one such group per crop, a row a line,
        + `</slice>`, as the real MiniCPM-Llama3-V-2.5 writes it."""
        one = IM_START + UNK * self.query_num + IM_END
        grid = self.grid(image)
        if grid is None:
            return one
        cols, rows = grid
        return one + SLICE_START + "\n".join(one * cols for _ in range(rows)) + SLICE_END
