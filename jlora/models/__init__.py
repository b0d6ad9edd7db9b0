"""Models for jlora: a Flax Llama decoder (:mod:`~jlora.models.llama`), readers and writers of its
files (Hugging Face folders in :mod:`~jlora.models.hf`, GGUF in :mod:`~jlora.models.gguf` and
:mod:`~jlora.models.gguf_writer`), tokenizers (:mod:`~jlora.models.tokenizer`) and a fine-tuning
command (:mod:`~jlora.models.sft`, ``jlora-sft``)."""
