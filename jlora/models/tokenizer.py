"""The tokenizer of a GGUF file: byte-level BPE with its pre-tokenizer splits and chat template.

Rebuilt from the file's ``tokenizer.ggml.*`` metadata with the ``tokenizers`` package (imported
on first use); the chat template is rendered with ``jinja2`` when the file has one.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["Tokenizer", "HFTokenizer", "render_chat_template"]

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


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    """A jinja2 template compiled in an environment like transformers' (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, a ``{% generation %}`` tag that just renders its body, JSON
    without HTML escaping, ``raise_exception`` and ``strftime_now``)."""
    import datetime
    import json

    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_render_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render_body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render a Hugging Face chat template (jinja2) the way transformers'
    ``apply_chat_template(..., tokenize=False)`` does.

    Args:
        template: The jinja source (``tokenizer_config.json``'s ``chat_template``).
        messages: The conversation, ``[{'role': ..., 'content': ...}, ...]``.
        add_generation_prompt: Passed to the template (open an assistant turn at the end).
        **variables: Everything else the template reads: ``bos_token``, ``eos_token``, ...

    Raises:
        ValueError: The template raised (``raise_exception``) or failed to render.

    Example:
        >>> t = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n{% endfor %}"
        >>> render_chat_template(t, [{"role": "user", "content": "hi"}])
        '[user] hi\\n'
    """
    import jinja2

    try:
        return _compile_template(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"Chat template error: {e}") from None


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
        from tokenizers import Tokenizer as _Backend
        from tokenizers import decoders, models

        tokens = list(tokens)
        types = list(token_types) if token_types is not None else [1] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{len(types)} token types for {len(tokens)} tokens.")
        pairs = _merge_pairs(merges)
        backend = _Backend(models.BPE(vocab=_byte_level_vocab(tokens, types), merges=pairs, unk_token=None,
                                      fuse_unk=False))
        backend.pre_tokenizer = _pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        _add_special_tokens(backend, tokens, types)

        self.backend = backend
        self.tokens = tokens
        self.token_types = types
        self.merges = [f"{left} {right}" for left, right in pairs]
        self.pre = pre
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
        **kwargs: Any,
    ) -> str:
        """Render chat ``messages`` (``[{'role': ..., 'content': ...}]``) as one prompt string.

        Uses the file's ``tokenizer.chat_template`` through jinja2 when both are available
        (SmolLM2's adds a default system prompt when the first message is not a system one);
        otherwise plain ChatML, ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

        Args:
            messages: The conversation.
            add_generation_prompt: End with ``<|im_start|>assistant\\n`` so the model answers.
            **kwargs: More variables for the template (``tools=...``), as transformers passes them.
        """
        if self.chat_template:
            try:
                import jinja2  # noqa: F401
            except ImportError:
                pass
            else:
                return render_chat_template(
                    self.chat_template,
                    messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self._token_or_empty(self._bos_id),
                    eos_token=self._token_or_empty(self._eos_id),
                    **kwargs,
                )
        return _render_chatml(messages, add_generation_prompt)

    def _token_or_empty(self, i: Optional[int]) -> str:
        return self.tokens[i] if i is not None else ""

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
            f"eos_id={self._eos_id}, pad_id={self._pad_id})"
        )


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizer folders.


def _token_text(value: Any) -> Optional[str]:
    """A special token as written in ``tokenizer_config.json``: a string or ``{'content': ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None



def _byte_level_vocab(tokens: Sequence[str], types: Sequence[int]) -> dict[str, int]:
    """GGUF tokens as a byte-level BPE vocabulary (the first id of a spelling wins)."""
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind not in (_CONTROL, _USER_DEFINED) and not set(tok) <= alphabet:
            # Raw text where byte-level spelling was expected: respell it.
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    return vocab


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"Malformed merge {merge!r}.")
        pairs.append((left, right))
    return pairs


def _pre_tokenizer(pre: str) -> Any:
    """The pre-tokenizer that llama.cpp's ``tokenizer.ggml.pre`` name stands for."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre not in _GPT2_PRE:
        warnings.warn(f"Unknown GGUF pre-tokenizer {pre!r}; using GPT-2's split.", stacklevel=3)
    return byte_level


def _add_special_tokens(backend: Any, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control tokens as special, user-defined ones as plain added tokens; every GGUF token must
    end up with its own id."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"Tokenizer has {backend.get_vocab_size(with_added_tokens=True)} entries for "
            f"{len(tokens)} GGUF tokens (duplicate spellings?)."
        )

class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (any model the ``tokenizers`` package runs) with the
    interface of :class:`Tokenizer`: ``encode``, ``decode``, ``apply_chat_template``,
    ``bos_id``, ``eos_id``, ``pad_id``.

    ``encode`` runs the ``tokenizers`` pipeline of the file, post-processor included, so BOS/EOS
    are added exactly where ``tokenizer.json`` says (Llama 3 adds ``<|begin_of_text|>``). The
    special tokens' names (``bos_token``, ...) and the chat template come from
    ``tokenizer_config.json`` (or ``chat_template.jinja``, which transformers 5 writes).

    Args:
        backend: A ``tokenizers.Tokenizer``.
        config: The ``tokenizer_config.json`` dict (kept as is and written back by
            :meth:`save_pretrained`).
        chat_template: Overrides ``config['chat_template']``.

    Example:
        >>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
        >>> backend = Backend(models.WordLevel({"<eos>": 0, "hi": 1, "there": 2}, unk_token="<eos>"))
        >>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tok = HFTokenizer(backend, {"eos_token": "<eos>"})
        >>> tok.encode("hi there"), tok.eos_id, tok.pad_id
        ([1, 2], 0, 0)
    """

    def __init__(
        self,
        backend: Any,
        config: Optional[Mapping[str, Any]] = None,
        *,
        chat_template: Optional[str] = None,
    ):
        self.backend = backend
        self.config = dict(config or {})
        template = chat_template if chat_template is not None else self.config.get("chat_template")
        if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        self.chat_template: Optional[str] = template
        vocab = backend.get_vocab(with_added_tokens=True)
        self.tokens = [""] * (max(vocab.values()) + 1 if vocab else 0)
        for text, i in vocab.items():
            self.tokens[i] = text
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._bos_id = self._id_of("bos_token")
        self._eos_id = self._id_of("eos_token")
        pad = self._id_of("pad_token")
        self._pad_id = pad if pad is not None else self._eos_id
        self.clean_up_tokenization_spaces = bool(self.config.get("clean_up_tokenization_spaces", False))

    def _id_of(self, key: str) -> Optional[int]:
        text = _token_text(self.config.get(key))
        if text is None:
            return None
        i = self.backend.token_to_id(text)
        if i is None:
            raise ValueError(f"tokenizer_config.json's {key} {text!r} is not in the vocabulary.")
        return int(i)

    @classmethod
    def from_pretrained(cls, directory: Any) -> "HFTokenizer":
        """Read ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (the last
        two optional) from a folder. Only JSON and text are read.

        Raises:
            FileNotFoundError: No ``tokenizer.json`` (a sentencepiece ``tokenizer.model`` alone is
                not read).
        """
        import json
        from pathlib import Path

        from tokenizers import Tokenizer as _Backend

        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            extra = " (only a sentencepiece tokenizer.model, which is not read)" if (
                directory / "tokenizer.model"
            ).is_file() else ""
            raise FileNotFoundError(f"{file} not found{extra}: jlora reads tokenizer.json.")
        config: dict = {}
        if (directory / "tokenizer_config.json").is_file():
            config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = None
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(_Backend.from_file(str(file)), config, chat_template=template)

    @classmethod
    def from_tokenizer(cls, tok: "Tokenizer") -> "HFTokenizer":
        """The Hugging Face form of a GGUF :class:`Tokenizer`: the same ``tokenizers`` pipeline,
        a post-processor that adds BOS/EOS when the GGUF file asks for them, and a
        ``tokenizer_config.json`` naming the special tokens and the chat template."""
        from tokenizers import Tokenizer as _Backend
        from tokenizers import processors

        backend = _Backend.from_str(tok.backend.to_str())
        single, specials = "$A", []
        if tok.add_bos and tok.bos_id is not None:
            single = f"{tok.tokens[tok.bos_id]} {single}"
            specials.append((tok.tokens[tok.bos_id], tok.bos_id))
        if tok.add_eos and tok.eos_id is not None:
            single = f"{single} {tok.tokens[tok.eos_id]}"
            specials.append((tok.tokens[tok.eos_id], tok.eos_id))
        if specials:
            pair = f"{single} {single.replace('$A', '$B:1')}"
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=sorted(set(specials))
            )
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(tok.add_bos),
            "add_eos_token": bool(tok.add_eos),
        }
        for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)):
            if i is not None:
                config[key] = tok.tokens[i]
        if tok.chat_template:
            config["chat_template"] = tok.chat_template
        return cls(backend, config)

    @property
    def bos_id(self) -> Optional[int]:
        """Id of ``tokenizer_config.json``'s ``bos_token`` (``None`` without one)."""
        return self._bos_id

    @property
    def eos_id(self) -> Optional[int]:
        """Id of ``eos_token`` (``None`` without one)."""
        return self._eos_id

    @property
    def pad_id(self) -> Optional[int]:
        """Id of ``pad_token``, else ``eos_id``."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return len(self.tokens)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with the post-processor's BOS/EOS when ``add_special_tokens``."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any iterable of ints, e.g. a 1-D array)."""
        if not hasattr(ids, "shape"):
            ids = list(ids)
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:  # transformers' clean_up_tokenization
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def special_tokens(self) -> dict[str, str]:
        """The template variables transformers passes: ``bos_token``, ``eos_token``, ... (as text)."""
        out = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            text = _token_text(self.config.get(key))
            if text is not None:
                out[key] = text
        extra = self.config.get("additional_special_tokens")
        if isinstance(extra, list):
            out["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
        return out

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the chat template (jinja2, as transformers does).

        Raises:
            ValueError: The tokenizer has no chat template.
        """
        if not self.chat_template:
            raise ValueError(
                "This tokenizer has no chat template (tokenizer_config.json's chat_template or "
                "chat_template.jinja); format the prompt yourself."
            )
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens(), **kwargs},
        )

    #: Files of another tokenizer save that :meth:`save_pretrained` supersedes, and so removes
    #: when it writes into a folder holding them: transformers and :meth:`from_pretrained` prefer
    #: an old ``chat_template.jinja`` to ``tokenizer_config.json``'s template, and transformers
    #: lets an old ``special_tokens_map.json`` override its special tokens.
    replaces = ("chat_template.jinja", "special_tokens_map.json")

    def files(self) -> dict[str, str]:
        """File name -> text of what :meth:`save_pretrained` writes: ``tokenizer.json`` and
        ``tokenizer_config.json`` (chat template inside)."""
        import json

        config = dict(self.config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        config.pop("auto_map", None)  # remote code is never referenced from what jlora writes
        return {
            "tokenizer.json": self.backend.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        }

    def save_pretrained(self, directory: Any) -> list[str]:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template inside) into
        ``directory``; returns the file names written. Both files are replaced together (each
        written to a temporary file first: a failure leaves the old ones as they were), and an old
        ``chat_template.jinja`` or ``special_tokens_map.json`` there is removed in the same
        commit (see :attr:`replaces`)."""
        from pathlib import Path

        from jlora._atomic import text_writer, write_files

        files = self.files()
        write_files(
            Path(directory),
            {name: text_writer(text) for name, text in files.items()},
            overwrite=True,
            what="HFTokenizer.save_pretrained",
            remove=self.replaces,
        )
        return list(files)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
            f"eos_id={self._eos_id}, pad_id={self._pad_id})"
        )
