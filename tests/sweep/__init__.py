"""The architecture sweep: every model type in transformers' causal-LM, seq2seq and
image-text-to-text mappings, built tiny and compared with plain transformers."""
