"""Example models for jlora: a Flax Llama decoder, its GGUF loader and tokenizer."""
