"""The inputs a sweep model runs on, from its (tiny) config alone.

`inputs(config)`: input_ids [1, SEQ] of ordinary tokens (below the special ids) and an
attention mask; decoder ids for encoder-decoders; and, for the models whose forward needs
more (an image, audio features, a robot state, layout boxes...), those too, small, with the
image placeholder tokens in input_ids where the model matches them to image features.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch

from sweep.tiny_configs import config_get

SEQ = 8  # prompt tokens


def inputs(config: Any) -> dict[str, Any]:
    batch = _text(config)
    build = _BUILDERS.get(config.model_type)
    if build is not None:
        build(config, batch)
        return batch
    family = _family(config)
    if family is not None:
        try:
            image = dict(batch)
            family(config, image)
            return image
        except Exception:  # an image path this file cannot drive: text only
            return batch
    return batch


def _family(config: Any) -> Callable[[Any, dict[str, Any]], None] | None:
    """A builder for a family of VLMs, known by what its config holds."""
    vision = getattr(config, "vision_config", None)
    if vision is None or _image_token(config) is None or config.model_type in _TEXT_ONLY:
        return None
    if _has(vision, "spatial_merge_size") and _takes(config, "image_grid_thw"):
        return _grid_image  # Qwen2-VL and the models built like it
    if _size(vision) and config_get(vision, "patch_size") is not None:
        return _square_image  # LLaVA and the models built like it
    return None


def _size(vision: Any) -> int | None:
    """A vision config's (square) image_size, an int or [height, width]."""
    size = config_get(vision, "image_size")
    if isinstance(size, (list, tuple)) and size and size[0] == size[-1]:
        size = size[0]
    return size if isinstance(size, int) else None


def _has(config: Any, key: str) -> bool:
    return isinstance(config_get(config, key), int)


def _image_token(config: Any) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        value = config_get(config, key)
        if isinstance(value, int):
            return value
    return None


def _grid_image(config: Any, batch: dict[str, Any]) -> None:
    """Qwen2-VL style: the image as a grid of patches (each flattened: channels x temporal
    patch x patch x patch), image_grid_thw giving the grid, one placeholder per merged
    spatial_merge_size^2 patches, between the vision start / end tokens where the config has
    them, and mm_token_type_ids marking the image tokens (its 3D RoPE positions)."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    temporal = config_get(vision, "temporal_patch_size", 1)
    channels = config_get(vision, "in_channels", config_get(vision, "num_channels", 3))
    side = 2 * merge
    width = channels * temporal * vision.patch_size**2
    batch["pixel_values"] = torch.randn(side * side, width, generator=_generator())
    batch["image_grid_thw"] = torch.tensor([[1, side, side]])
    count = side * side // merge**2
    start, end = (
        config_get(config, "vision_start_token_id"),
        config_get(config, "vision_end_token_id"),
    )
    tokens = (
        [start] * (start is not None) + [_image_token(config)] * count + [end] * (end is not None)
    )
    _prepend(batch, tokens)
    if _takes(config, "mm_token_type_ids"):
        kinds = torch.zeros_like(batch["input_ids"])
        kinds[batch["input_ids"] == _image_token(config)] = 1
        batch["mm_token_type_ids"] = kinds


def _square_image(config: Any, batch: dict[str, Any]) -> None:
    """One image [1, channels, image_size, image_size] (with its size, or as the one tile of
    a [1, 1, ...] batch with its pixel mask, where the model asks for those), and as many
    placeholders before the text as the model makes image features of it: counted by running
    the model's own get_image_features on it (a throwaway copy of the model; the count
    depends on CLS tokens, feature selection, pixel shuffles, pooling)."""
    size = _size(config.vision_config)
    model = _throwaway(config)
    get = getattr(model, "get_image_features", None)
    get = get or getattr(getattr(model, "model", None), "get_image_features", None)
    if get is None:
        return
    wants = inspect.signature(get).parameters
    image: dict[str, Any] = {"pixel_values": _pixels(config.vision_config, 1)}
    if "pixel_attention_mask" in wants:
        image["pixel_values"] = image["pixel_values"][None]
        image["pixel_attention_mask"] = torch.ones(1, 1, size, size, dtype=torch.bool)
    if "image_sizes" in wants:
        image["image_sizes"] = torch.tensor([[size, size]])
        pinpoints = config_get(config, "image_grid_pinpoints")
        if pinpoints:  # LLaVA-NeXT "anyres": the base image and its tiles, stacked
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            tiles = image_size_to_num_patches((size, size), pinpoints, size)
            image["pixel_values"] = _pixels(config.vision_config, 1, tiles)
    with torch.no_grad():
        out = get(**image)
    out = getattr(out, "pooler_output", out)
    parts = out if isinstance(out, (list, tuple)) else [out]
    count = sum(p.shape[-2] for p in parts if isinstance(p, torch.Tensor) and p.dim() >= 2)
    if count:  # (else features this file cannot count: text only)
        batch.update(image)
        _prepend(batch, [_image_token(config)] * count)


def _throwaway(config: Any) -> Any:
    """The model of `config` with random weights (the sweep's RNG left as it was)."""
    from transformers import AutoModel, AutoModelForImageTextToText

    with torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            return AutoModelForImageTextToText.from_config(config).eval()
        except ValueError:  # not an image-text-to-text config
            return AutoModel.from_config(config).eval()


def _takes(config: Any, argument: str) -> bool:
    """Whether the config's modeling module names `argument` (an input its models take)."""
    name = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        module = sys.modules.get(name) or importlib.import_module(name)
        return argument in inspect.getsource(module)
    except (ImportError, OSError, TypeError):
        return False


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _ids(config: Any, length: int = SEQ) -> torch.Tensor:
    text = config.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None) or 256
    high = max(min(vocab, 400), 8)
    return torch.randint(4, high, (1, length), generator=_generator())


def _text(config: Any) -> dict[str, Any]:
    ids = _ids(config)
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None) or 0
        batch["decoder_input_ids"] = torch.tensor([[start, *ids[0, :3].tolist()]])
    return batch


def _pixels(vision: Any, *lead: int) -> torch.Tensor:
    """Images [*lead, channels, size, size] from a vision config, values like a normalized
    image's."""
    size = config_get(vision, "image_size", 16)
    size = size[0] if isinstance(size, (list, tuple)) else size
    channels = config_get(vision, "num_channels", 3)
    return torch.randn(*lead, channels, size, size, generator=_generator())


def _prepend(batch: dict[str, Any], tokens: list[int]) -> None:
    """`tokens` before the prompt (image placeholders where the processor puts them)."""
    ids = torch.cat([torch.tensor([tokens]), batch["input_ids"]], dim=1)
    batch["input_ids"] = ids
    batch["attention_mask"] = torch.ones_like(ids)


def _blip(config: Any, batch: dict[str, Any]) -> None:
    batch["pixel_values"] = _pixels(config.vision_config, 1)


def _blip_2(config: Any, batch: dict[str, Any]) -> None:
    """BLIP-2 / InstructBLIP: an image, num_query_tokens placeholders before the text (the
    Q-Former's outputs go there); InstructBLIP also prompts its Q-Former."""
    video = config.model_type == "instructblipvideo"
    frames = 4 if video else 1  # InstructBLIP-Video: always 4 frames
    lead = (1, frames) if video else (1,)
    batch["pixel_values"] = _pixels(config.vision_config, *lead)
    token = config_get(config, "video_token_index" if video else "image_token_index")
    if token is not None:
        _prepend(batch, [token] * config.num_query_tokens * frames)
    if config.model_type.startswith("instructblip"):
        qformer = torch.randint(4, 400, (1, 6), generator=_generator())
        batch["qformer_input_ids"] = qformer
        batch["qformer_attention_mask"] = torch.ones_like(qformer)


def _idefics(config: Any, batch: dict[str, Any]) -> None:
    """IDEFICS: one image, every text token attending to it (its gated cross-attention)."""
    batch["pixel_values"] = _pixels(config.vision_config, 1, 1)
    batch["image_attention_mask"] = torch.ones(1, batch["input_ids"].shape[1], 1, dtype=torch.long)


def _kosmos_2(config: Any, batch: dict[str, Any]) -> None:
    """Kosmos-2: bos, <image>, latent_query_num slots, </image> before the text, the slots
    marked in image_embeds_position_mask (which places the image features; the ids there
    are ordinary tokens)."""
    count = config.latent_query_num
    _prepend(batch, [0, 3, *[5] * count, 4])
    mask = torch.zeros_like(batch["input_ids"])
    mask[0, 2 : 2 + count] = 1
    batch["image_embeds_position_mask"] = mask
    batch["pixel_values"] = _pixels(config.vision_config, 1)


def _pix2struct(config: Any, batch: dict[str, Any]) -> None:
    """Pix2Struct reads flattened patches (row, column, patch pixels), not input_ids."""
    patches = 16
    width = config.vision_config.patch_embed_hidden_size
    rows = torch.arange(patches) // 4 + 1
    columns = torch.arange(patches) % 4 + 1
    pixels = torch.randn(patches, width, generator=_generator())
    flat = torch.cat([rows[:, None].float(), columns[:, None].float(), pixels], dim=1)
    del batch["input_ids"]
    batch["flattened_patches"] = flat[None]
    batch["attention_mask"] = torch.ones(1, patches, dtype=torch.long)


def _pp_formulanet(config: Any, batch: dict[str, Any]) -> None:
    """PP-FormulaNet reads the formula image (its encoder), not input_ids."""
    del batch["input_ids"], batch["attention_mask"]
    batch["pixel_values"] = _pixels(config.vision_config, 1)


def _vision_encoder_decoder(config: Any, batch: dict[str, Any]) -> None:
    """An image encoder: pixel_values instead of input_ids."""
    del batch["input_ids"], batch["attention_mask"]
    batch["pixel_values"] = _pixels(config.encoder, 1)


def _udop(config: Any, batch: dict[str, Any]) -> None:
    """UDOP: a layout box (0-1000 coordinates) per token, and the page image."""
    length = batch["input_ids"].shape[1]
    corner = torch.randint(0, 500, (1, length, 2), generator=_generator())
    batch["bbox"] = torch.cat([corner, corner + 100], dim=-1)
    batch["pixel_values"] = _pixels(config, 1)


def _pi0(config: Any, batch: dict[str, Any]) -> None:
    """PI0 (a vision-language-action model): a robot state, one camera image (its tokens in
    input_ids), and the flow-matching noise and timestep (random when not given)."""
    vision = config.vlm_config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    _prepend(batch, [config.vlm_config.image_token_id] * tokens)
    batch["pixel_values"] = _pixels(vision, 1, 1)
    batch["pixel_attention_mask"] = torch.ones(1, 1, dtype=torch.bool)
    generator = _generator()
    batch["state"] = torch.randn(1, config.max_state_dim, generator=generator)
    batch["noise"] = torch.randn(1, config.chunk_size, config.max_action_dim, generator=generator)
    batch["timestep"] = torch.tensor([0.5])


def _voxtral_realtime(config: Any, batch: dict[str, Any]) -> None:
    """Voxtral Realtime adds one audio frame group to each token: log-mel features of 8
    frames a token (the encoder's stride 2, then downsample_factor frames merged)."""
    frames = batch["input_ids"].shape[1] * 2 * config.downsample_factor
    mels = config.audio_config.num_mel_bins
    batch["input_features"] = torch.randn(1, mels, frames, generator=_generator())


def _diffusion_gemma(config: Any, batch: dict[str, Any]) -> None:
    """A block-diffusion model refines a canvas, random when not given: give it one."""
    batch["decoder_input_ids"] = _ids(config, config.canvas_length)


# VLMs a family builder would give an image but whose image path needs more than it gives
_TEXT_ONLY = {
    "hunyuan_vl",  # its image tokens add a marker per row and begin / end ones to the grid's
    "deepseek_vl_hybrid",  # takes a second, high-resolution image too
    "granite_docling",  # its pixel_attention_mask is not the Idefics3 one this file makes
    "paddleocr_vl",  # its patches come [batch, patches, channels, patch, patch], not flattened
    "glmga",  # its vision tower does not get image_grid_thw passed through
    "hy_v4_vl",  # more image tokens than merged patches (markers of its own)
    "inkling2",  # patches laid out for its own space-to-depth stages
    "inkling2_loop",  # (as inkling2)
}


def _musicgen(config: Any, batch: dict[str, Any]) -> None:
    """A MusicGen decoder reads one row of audio codes per codebook."""
    codebooks = config.get_text_config(decoder=True).num_codebooks
    codes = torch.randint(4, 400, (codebooks, batch["input_ids"].shape[1]), generator=_generator())
    batch["input_ids"] = codes
    batch["attention_mask"] = torch.ones(1, codes.shape[1], dtype=torch.long)


_BUILDERS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "blip": _blip,
    "blip-2": _blip_2,
    "instructblip": _blip_2,
    "instructblipvideo": _blip_2,
    "idefics": _idefics,
    "kosmos-2": _kosmos_2,
    "pix2struct": _pix2struct,
    "vision-encoder-decoder": _vision_encoder_decoder,
    "pp_formulanet": _pp_formulanet,
    "udop": _udop,
    "pi0": _pi0,
    "voxtral_realtime": _voxtral_realtime,
    "diffusion_gemma": _diffusion_gemma,
    "musicgen_decoder": _musicgen,
    "musicgen_melody_decoder": _musicgen,
}
