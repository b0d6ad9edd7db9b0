"""The tokenizer of a GGUF file: byte-level BPE with its pre-tokenizer splits and chat template.

Rebuilt from the file's ``tokenizer.ggml.*`` metadata with the ``tokenizers`` package (imported
on first use); the chat template is rendered with ``jinja2`` when the file has one.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["Tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits, by `tokenizer.ggml.pre` (llama.cpp's names).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "minerva", "exaone", "command-r"}
_GPT2_PRE = {"default", "gpt2", "gpt-2", "olmo", "jais", "poro-chat", "viking"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    given the characters U+0100, U+0101, ... in byte order, so a space is ``Ġ`` (U+0120).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _render_chatml(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class Tokenizer:
    """Byte-level BPE tokenizer (GPT-2 style) rebuilt from a GGUF vocabulary and merges.

    Control tokens (GGUF token type 3, e.g. ``<|im_start|>``) are special tokens matched whole
    in the text; user-defined ones (type 4) are matched whole too but are not special. No BOS/EOS
    is added unless the file asks for it (``tokenizer.ggml.add_bos_token``).

    Args:
        tokens: Vocabulary, index = id, spelled in GPT-2's byte alphabet.
        merges: BPE merges, ``"left right"`` strings, best first.
        token_types: GGUF token types, one per token (1 normal, 3 control, 4 user-defined).
        bos_id: Begin-of-sequence id.
        eos_id: End-of-sequence id.
        pad_id: Padding id (defaults to ``eos_id``).
        add_bos: Prepend ``bos_id`` in :meth:`encode`.
        add_eos: Append ``eos_id`` in :meth:`encode`.
        chat_template: Jinja chat template (``tokenizer.chat_template``).
        pre: llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``), which picks the regex that
            splits text before BPE (``smollm``: single digits, then GPT-2's split).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        *,
        token_types: Optional[Sequence[int]] = None,
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        pad_id: Optional[int] = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: Optional[str] = None,
        pre: str = "gpt2",
    ):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _Backend

        tokens = list(tokens)
        types = list(token_types) if token_types is not None else [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{len(types)} token types for {len(tokens)} tokens.")
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for i, (tok, kind) in enumerate(zip(tokens, types)):
            if kind not in (_CONTROL, _USER_DEFINED) and not set(tok) <= alphabet:
                # Raw text where byte-level spelling was expected: respell it.
                tok = "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ValueError(f"Malformed merge {merge!r}.")
            pairs.append((left, right))

        backend = _Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGIT_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        elif pre in _LLAMA3_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            if pre not in _GPT2_PRE:
                warnings.warn(
                    f"Unknown GGUF pre-tokenizer {pre!r}; using GPT-2's split.", stacklevel=2
                )
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        control = [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(tokens, types)
            if kind == _CONTROL
        ]
        user = [
            AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, types)
            if kind == _USER_DEFINED
        ]
        if control:
            backend.add_special_tokens(control)
        if user:
            backend.add_tokens(user)
        if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise ValueError(
                f"Tokenizer has {backend.get_vocab_size(with_added_tokens=True)} entries for "
                f"{len(tokens)} GGUF tokens (duplicate spellings?)."
            )

        self.backend = backend
        self.tokens = tokens
        self.special_ids = frozenset(i for i, kind in enumerate(types) if kind == _CONTROL)
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, source: Any) -> "Tokenizer":
        """Build from a GGUF file path or an open ``gguf.GGUFReader``."""
        from jlora.models.gguf import metadata, open_reader

        if isinstance(source, (str, os.PathLike)):
            source = open_reader(source)
        model = metadata(source, "tokenizer.ggml.model")
        if model != "gpt2":
            raise NotImplementedError(
                f"Only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model!r}."
            )
        return cls(
            metadata(source, "tokenizer.ggml.tokens"),
            metadata(source, "tokenizer.ggml.merges"),
            token_types=metadata(source, "tokenizer.ggml.token_type", None),
            bos_id=metadata(source, "tokenizer.ggml.bos_token_id", None),
            eos_id=metadata(source, "tokenizer.ggml.eos_token_id", None),
            pad_id=metadata(source, "tokenizer.ggml.padding_token_id", None),
            add_bos=bool(metadata(source, "tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(metadata(source, "tokenizer.ggml.add_eos_token", False)),
            chat_template=metadata(source, "tokenizer.chat_template", None),
            pre=metadata(source, "tokenizer.ggml.pre", "gpt2"),
        )

    @property
    def bos_id(self) -> Optional[int]:
        """Begin-of-sequence id (``None`` if the file names none)."""
        return self._bos_id

    @property
    def eos_id(self) -> Optional[int]:
        """End-of-sequence id; for SmolLM2-Instruct ``<|im_end|>`` (2)."""
        return self._eos_id

    @property
    def pad_id(self) -> Optional[int]:
        """Padding id (the file's, else ``eos_id``)."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self.tokens)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) stay whole.

        Args:
            text: The text.
            add_special_tokens: Add BOS/EOS if the file asks for them (SmolLM2's does not).
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos and self._bos_id is not None:
                ids = [self._bos_id, *ids]
            if self.add_eos and self._eos_id is not None:
                ids = [*ids, self._eos_id]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any iterable of ints, e.g. a 1-D array)."""
        if not hasattr(ids, "shape"):
            ids = list(ids)
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render chat ``messages`` (``[{'role': ..., 'content': ...}]``) as one prompt string.

        Uses the file's ``tokenizer.chat_template`` through jinja2 when both are available
        (SmolLM2's adds a default system prompt when the first message is not a system one);
        otherwise plain ChatML, ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

        Args:
            messages: The conversation.
            add_generation_prompt: End with ``<|im_start|>assistant\\n`` so the model answers.
        """
        messages = [dict(m) for m in messages]
        if self.chat_template:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                ImmutableSandboxedEnvironment = None
            if ImmutableSandboxedEnvironment is not None:

                def raise_exception(message: str) -> None:
                    raise ValueError(f"Chat template error: {message}")

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = raise_exception
                template = env.from_string(self.chat_template)
                return template.render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self._token_or_empty(self._bos_id),
                    eos_token=self._token_or_empty(self._eos_id),
                )
        return _render_chatml(messages, add_generation_prompt)

    def _token_or_empty(self, i: Optional[int]) -> str:
        return self.tokens[i] if i is not None else ""

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
            f"eos_id={self._eos_id}, pad_id={self._pad_id})"
        )
