"""Config of a tiny MiniCPM-Llama3-V-2.5 look-alike, shipped as custom code (trust_remote_code).

Like the real `MiniCPMVConfig`, it IS a Llama config (the language model's sizes sit at the
top level) plus the vision fields: `vision_config` (an Idefics2/SigLIP vision transformer),
`query_num` (the resampler's fixed number of query tokens), the slicing fields
(`slice_mode`, `max_slice_nums`, `scale_resolution`, `patch_size`) and `image_token_id`,
the id of the image placeholder token (`<unk>`, as in the real model). It is written in
the hub's old style, with its own `__init__`, as remote code is.
"""

from typing import ClassVar

from transformers import LlamaConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig


class TinyMiniCPMVConfig(LlamaConfig):
    model_type = "tiny_minicpmv"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    default_vision_config: ClassVar[dict] = {
        "hidden_size": 32,
        "image_size": 28,
        "intermediate_size": 64,
        "model_type": "idefics2_vision",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "patch_size": 14,
    }

    def __init__(
        self,
        use_cache=True,
        query_num=4,
        slice_mode=True,
        max_slice_nums=4,
        scale_resolution=28,
        patch_size=14,
        image_token_id=0,
        vision_config=None,
        **kwargs,
    ):
        self.use_cache = use_cache
        self.query_num = query_num
        self.slice_mode = slice_mode
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.image_token_id = image_token_id  # `<unk>`: the image placeholder token
        if vision_config is None:
            vision_config = dict(self.default_vision_config)
        if isinstance(vision_config, dict):
            vision_config = {k: v for k, v in vision_config.items() if k != "model_type"}
            vision_config = Idefics2VisionConfig(**vision_config)
        self.vision_config = vision_config
        super().__init__(use_cache=use_cache, **kwargs)
