"""Processor of the tiny MiniCPM-V look-alike (AutoProcessor, custom code): the image
processor plus the tokenizer. It turns a chat prompt holding one `(<image>./</image>)`
marker per image into input ids with the image placeholders, and finds the placeholder
spans (`image_bound`) the model writes the image features into.
"""

import torch
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_tiny_minicpmv import IM_END, IM_START

IMAGE_MARKER = "(<image>./</image>)"


class TinyMiniCPMVProcessor(ProcessorMixin):
    image_token = IMAGE_MARKER  # what a prompt holds per image, before __call__ expands it

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, text, images=None, return_tensors="pt", **kwargs):
        """One prompt and its images -> input_ids [1, T], attention_mask [1, T],
        pixel_values [N, 3, S, S] (None without images), image_bound [[n, 2]]: each row the
        [start, end) positions of one image's (or crop's) placeholder tokens."""
        images = [] if images is None else list(images)
        pieces = text.split(IMAGE_MARKER)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"{len(pieces) - 1} image markers in the text for {len(images)} images"
            )
        prompt = pieces[0]
        for image, rest in zip(images, pieces[1:], strict=True):
            prompt += self.image_processor.get_slice_image_placeholder(image) + rest
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        starts = torch.where(ids[0] == self.tokenizer.convert_tokens_to_ids(IM_START))[0] + 1
        ends = torch.where(ids[0] == self.tokenizer.convert_tokens_to_ids(IM_END))[0]
        n = min(len(starts), len(ends))
        bound = torch.stack([starts[:n], ends[:n]], dim=1) if n else torch.zeros(0, 2).long()
        pixel_values = self.image_processor(images)["pixel_values"] if images else None
        return BatchFeature(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "pixel_values": pixel_values,
                "image_bound": [bound],
            }
        )
