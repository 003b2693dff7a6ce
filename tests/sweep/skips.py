"""Sweep pairs that cannot be swept, each with the reason (checked against transformers 5.24).

Keys are "model_type" (every class of that type) or "model_type:ClassName".
"""

from __future__ import annotations

SKIPS: dict[str, str] = {
    "fast_vlm": "needs the timm package (its vision tower is a TimmWrapperModel), not installed",
    "gemma3n:Gemma3nForConditionalGeneration": (
        "needs the timm package (its vision tower is a TimmWrapperModel), not installed"
    ),
    "perception_lm": (
        "needs the timm package (its vision tower is a TimmWrapperModel), not installed"
    ),
    "gemma4_assistant": (
        "a speculative-decoding assistant: forward needs the backbone's inputs_embeds and "
        "shared_kv_states, and generate on its own fails in transformers itself (get_seq_length "
        "... only LinearAttention layers)"
    ),
    "gemma4_unified_assistant": (
        "a speculative-decoding assistant: forward needs the backbone's inputs_embeds and "
        "shared_kv_states, and generate on its own fails in transformers itself (get_seq_length "
        "... only LinearAttention layers)"
    ),
    "blt": (
        "generate fails in transformers 5.24 itself: DynamicCache reads "
        "BltConfig.num_hidden_layers, which BltConfig lacks (forward and round-trip work)"
    ),
    "diffusion_gemma": (
        "generate draws its canvas with torch.randint even with do_sample=False: two greedy "
        "runs of the same model differ, so greedy tokens cannot be compared"
    ),
    "voxtral_realtime": (
        "forward adds one audio frame group to each input token (audio for exactly the prompt), "
        "while generate stops at the audio's token count (it needs audio for the new tokens "
        "too): no one input serves both the logits and the greedy check"
    ),
    "llama4:Llama4ForConditionalGeneration": (
        "transformers 5.24 bug: Llama4ForConditionalGeneration.forward reads "
        "outputs.image_outputs, which the language model's MoeCausalLMOutputWithPast lacks "
        "(AttributeError on every call)"
    ),
    "shieldgemma2": (
        "transformers 5.24 cannot round-trip it: from_pretrained reports the saved "
        "model.model.language_model.model.* weights UNEXPECTED and model.language_model.* "
        "MISSING, so the language model loads random weights"
    ),
    "musicgen:MusicgenForCausalLM": (
        "transformers 5.24 bug: MusicgenForCausalLM.generate passes "
        "generation_config.num_return_sequences (None by default) to "
        "_expand_inputs_for_generation: TypeError from repeat_interleave(None)"
    ),
}

# bf16 is compared against transformers' own from_pretrained(dtype=bfloat16); where that
# cannot run the model at all, only the float32 comparison (half on disk) is made
BF16_REFERENCE_FAILS: dict[str, str] = {
    "xlnet": (
        "transformers 5.24 cannot run XLNetLMHeadModel in bf16 on CPU: einsum of the bf16 "
        "hidden states with its float32 relative-position tensors (expected scalar type Float)"
    ),
    "reformer": (
        "transformers 5.24 cannot run ReformerModelWithLMHead in bf16 on CPU: its layer norm "
        "gets float32 inputs for bf16 weights (mixed dtype, expect parameter to be Float)"
    ),
}
