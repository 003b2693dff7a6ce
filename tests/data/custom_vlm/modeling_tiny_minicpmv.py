"""A tiny MiniCPM-Llama3-V-2.5 look-alike, shipped as custom code (trust_remote_code).

The same top-level modules as the real `MiniCPMV`: `llm` (a LlamaForCausalLM built from the
config), `vpm` (an Idefics2 vision transformer, SigLIP-like) and `resampler` (learned
queries cross-attending to the patches, projected to the llm width). The image features
replace the embeddings of the `<unk>` placeholders between `<image>` and `</image>`, then
the llm runs on `inputs_embeds`.
"""

from copy import deepcopy
from typing import ClassVar

import torch
from transformers import LlamaForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from .configuration_tiny_minicpmv import TinyMiniCPMVConfig
from .image_processing_tiny_minicpmv import TinyMiniCPMVImageProcessor
from .processing_tiny_minicpmv import IMAGE_MARKER, TinyMiniCPMVProcessor
from .resampler import Resampler


class TinyMiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = TinyMiniCPMVConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["LlamaDecoderLayer", "Idefics2EncoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim**-0.5)
            init.copy_(module.pos_embed, module.compute_pos_embed())


class TinyMiniCPMV(TinyMiniCPMVPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.llm = LlamaForCausalLM(config)
        self.vpm = Idefics2VisionTransformer(config.vision_config)
        self.vision_dim = config.vision_config.hidden_size
        self.embed_dim = config.hidden_size
        side = config.vision_config.image_size // config.vision_config.patch_size
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=self.embed_dim,
            num_heads=max(1, self.embed_dim // 16),
            kv_dim=self.vision_dim,
            max_size=(side, side),
        )
        self.terminators = ["<|eot_id|>", "<|end_of_text|>"]
        self.post_init()

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.llm.set_output_embeddings(value)

    def get_image_features(self, pixel_values):
        """[N, 3, S, S] crops -> [N, query_num, hidden_size] features for the llm."""
        patch = self.config.vision_config.patch_size
        grid = (pixel_values.shape[2] // patch, pixel_values.shape[3] // patch)
        hidden = self.vpm(pixel_values).last_hidden_state  # [N, h * w, vision hidden]
        return self.resampler(hidden, grid)

    def get_vllm_embedding(self, input_ids, pixel_values=None, image_bound=None):
        """Token embeddings with the image features written over the placeholder tokens.

        `image_bound`: per sequence, an [n, 2] tensor of [start, end) placeholder spans,
        filled in order with the features of `pixel_values` (crops of the whole batch, in
        order). Without it, the positions holding `config.image_token_id` are filled.
        As the real model, the vision tower runs at embed_tokens' device and dtype.
        """
        embed_tokens = self.llm.model.embed_tokens
        inputs_embeds = embed_tokens(input_ids)
        if pixel_values is None:
            return inputs_embeds
        weight = embed_tokens.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        features = self.get_image_features(pixel_values)  # [N, Q, D]
        features = features.to(inputs_embeds.device, inputs_embeds.dtype)
        if image_bound is None:
            mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            if input_ids.device.type != "meta" and int(mask.sum()) != features[..., 0].numel():
                raise ValueError(
                    f"{int(mask.sum())} image placeholder tokens for "
                    f"{features[..., 0].numel()} image features"
                )
            return inputs_embeds.masked_scatter(mask.expand_as(inputs_embeds), features)
        flat = features.reshape(-1, features.shape[-1])
        used, rows = 0, []
        for i, bounds in enumerate(image_bound):
            emb = inputs_embeds[i]
            if len(bounds) > 0:
                index = torch.cat([torch.arange(int(s), int(e)) for s, e in bounds])
                index = index.to(emb.device)
                take = flat[used : used + len(index)]
                used += len(index)
                emb = emb.index_copy(0, index, take)
            rows.append(emb)
        if used != flat.shape[0]:
            raise ValueError(f"{used} image placeholder tokens for {flat.shape[0]} image features")
        return torch.stack(rows)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        image_bound=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        **kwargs,
    ):
        """The llm's forward on the embeddings with the images written in; the KV cache
        (`cache`, or the older `past_key_values`) and the rest pass through in `kwargs`."""
        if inputs_embeds is None:
            inputs_embeds = self.get_vllm_embedding(input_ids, pixel_values, image_bound)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    @classmethod
    def can_generate(cls):
        return True  # its own generate, below

    def generate(self, input_ids, pixel_values=None, image_bound=None, attention_mask=None, **kw):
        """Generate from the processor's outputs, as the real MiniCPM-V's `generate`: the
        image features go into the placeholder embeddings, the llm generates from those."""
        device = self.llm.model.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            inputs_embeds = self.get_vllm_embedding(input_ids, pixel_values, image_bound)
            return self.llm.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask.to(device), **kw
            )

    def default_processor(self, tokenizer):
        """The processor `chat` uses when given none: built from the config, no files read."""
        image_processor = TinyMiniCPMVImageProcessor.from_model_config(self.config)
        return TinyMiniCPMVProcessor(image_processor=image_processor, tokenizer=tokenizer)

    def chat(
        self,
        image,
        msgs,
        tokenizer,
        processor=None,
        max_new_tokens=64,
        sampling=False,
        system_prompt="",
        **generate_kwargs,
    ):
        """Answer the last user message of `msgs` ([{"role": ..., "content": ...}]) about
        `image` (a PIL image, or None), like the real MiniCPM-V's `chat`: the image goes
        before the first message's text, the tokenizer's chat template makes the prompt,
        the processor expands the image into placeholders, and the llm generates from the
        embeddings. Greedy unless `sampling`; returns the decoded answer."""
        if processor is None:
            processor = self.default_processor(tokenizer)
        copy_msgs = deepcopy(msgs)
        if not copy_msgs:
            raise ValueError("msgs is empty")
        if image is not None and isinstance(copy_msgs[0]["content"], str):
            copy_msgs[0]["content"] = [image, copy_msgs[0]["content"]]
        images = []
        for i, msg in enumerate(copy_msgs):
            if msg["role"] not in ("user", "assistant"):
                raise ValueError(f"role must be user or assistant, got {msg['role']!r}")
            if i == 0 and msg["role"] != "user":
                raise ValueError("the first message must be the user's")
            content = msg["content"]
            parts = []
            for c in [content] if isinstance(content, str) else content:
                if isinstance(c, str):
                    parts.append(c)
                else:
                    images.append(c)
                    parts.append(IMAGE_MARKER)
            msg["content"] = "\n".join(parts)
        if system_prompt:
            copy_msgs.insert(0, {"role": "system", "content": system_prompt})
        prompt = tokenizer.apply_chat_template(
            copy_msgs, tokenize=False, add_generation_prompt=True
        )
        inputs = processor(prompt, images)

        device = self.llm.model.embed_tokens.weight.device
        input_ids = inputs["input_ids"].to(device)
        pixel_values = inputs["pixel_values"]
        terminators = [tokenizer.convert_tokens_to_ids(t) for t in self.terminators]
        if sampling:
            options = {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "repetition_penalty": 1.05}
        else:
            options = {}
        options.update(generate_kwargs)
        with torch.inference_mode():
            inputs_embeds = self.get_vllm_embedding(input_ids, pixel_values, inputs["image_bound"])
            output = self.llm.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=inputs["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                pad_token_id=terminators[-1],
                eos_token_id=terminators,
                **options,
            )
        return tokenizer.decode(output[0], skip_special_tokens=True)
