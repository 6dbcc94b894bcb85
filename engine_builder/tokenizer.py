"""An engine's tokenizer: text <-> ids, chat templates, and streaming detokenization.

Special tokens written in text (``<|im_start|>``) always encode as their single control id,
as Hugging Face does with ``split_special_tokens=False``: raw ChatML prompts work, and
``encode_chat`` is simply render-then-encode.

``IncrementalDetokenizer`` works on bytes for byte-level BPE vocabularies (each id maps to a
fixed byte string), so a character whose UTF-8 bytes span several tokens is emitted exactly
once, when complete, and U+FFFD never appears for a split character. Other vocabularies fall
back to decoding a window of ids and holding back text that ends in U+FFFD.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from engine_builder.manifest import Manifest

# Texts at least this long are encoded with the GIL released (see EngineTokenizer._encode).
GIL_FREE_ENCODE_CHARS = 2048


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_byte_level(tokenizer_json: Mapping[str, Any]) -> bool:
    decoder = tokenizer_json.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


class EngineTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with the engine's BOS/EOS policy and chat template."""

    def __init__(self, tokenizer: Tokenizer, *, eos_token_ids: Sequence[int],
                 bos_token_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, byte_level: bool = False) -> None:
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._template = None if chat_template is None else _compile_template(chat_template)
        # id -> exact bytes, for byte-level vocabularies only
        self.token_bytes: list[bytes] | None = self._byte_table() if byte_level else None

    @classmethod
    def load(cls, engine_dir: Path, manifest: Manifest) -> EngineTokenizer:
        path = manifest.tokenizer_path(engine_dir)
        text = path.read_text(encoding="utf-8")
        template_path = manifest.chat_template_path(engine_dir)
        template = None if template_path is None else template_path.read_text(encoding="utf-8")
        info = manifest.tokenizer
        return cls(Tokenizer.from_str(text), eos_token_ids=info.eos_token_ids,
                   bos_token_id=info.bos_token_id, add_bos=info.add_bos,
                   chat_template=template, byte_level=_is_byte_level(json.loads(text)))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Ids of text, special-token strings included as control ids; BOS first if add_bos."""
        ids = self._encode(text)
        if self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages (HF conventions). ValueError without one."""
        if self._template is None:
            raise ValueError("this engine has no chat template")
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_ids[0]),
        )

    def encode_chat(self, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> list[int]:
        """Render then encode. No BOS is added: templates that want one write ``bos_token``."""
        text = self.render_chat(messages, add_generation_prompt)
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        # ``Tokenizer.encode`` holds the GIL throughout (seconds for megabytes of text, every
        # other thread stalled); ``encode_batch`` releases it, so a long text is encoded as a
        # batch of one and other threads (a server's event loop) keep running meanwhile.
        if len(text) < GIL_FREE_ENCODE_CHARS:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._tok.encode_batch([text], add_special_tokens=False)[0].ids)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._tok.id_to_token(token_id) or ""

    def _byte_table(self) -> list[bytes]:
        decode_char = {c: b for b, c in byte_level_alphabet().items()}
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        table: list[bytes] = []
        for token_id in range(self.vocab_size):
            if token_id in added:
                table.append(added[token_id].encode("utf-8"))
                continue
            token = self._tok.id_to_token(token_id) or ""
            if all(c in decode_char for c in token):
                table.append(bytes(decode_char[c] for c in token))
            else:  # not written in the byte alphabet (rare hand-added tokens): take it as text
                table.append(token.encode("utf-8"))
        return table


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: object, indent: int | None = None) -> str:
    # HF's variant: keeps non-ASCII as is, unlike jinja2's HTML-safe built-in.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _compile_template(source: str) -> jinja2.Template:
    # Sandboxed: templates come with checkpoints, which are untrusted input.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a growing id stream into text deltas that never split a UTF-8 character.

    ``prefix_ids`` are ids whose text is already out (the prompt, or the tokens generated before
    a preemption); they give context, and an incomplete character at their end is completed by
    the first pushed ids. Special tokens are skipped unless ``skip_special_tokens`` is False.
    """

    def __init__(self, tokenizer: EngineTokenizer, prefix_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Fallback state (non-byte-level vocabularies): all ids, and two offsets into them.
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        if self._bytes is not None:
            self._push_bytes(prefix_ids)  # text already out; keep only a dangling partial char
        else:
            self._ids = [i for i in prefix_ids if i not in self._skip]
            self._prefix_offset = max(0, len(self._ids) - 5)  # a little context for spacing
            self._read_offset = len(self._ids)

    def push(self, ids: Sequence[int]) -> str:
        """The text the new ids complete; an incomplete trailing character is held back."""
        if self._bytes is not None:
            return self._push_bytes(ids)
        self._ids.extend(i for i in ids if i not in self._skip)
        return self._push_window(final=False)

    def flush(self) -> str:
        """Whatever is held back, with U+FFFD for bytes that never formed a character."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        return self._push_window(final=True)

    def _push_bytes(self, ids: Sequence[int]) -> str:
        assert self._bytes is not None
        vocab = len(self._bytes)
        data = b"".join(self._bytes[i] for i in ids if i not in self._skip and 0 <= i < vocab)
        return self._utf8.decode(data)

    def _push_window(self, *, final: bool) -> str:
        window = self._ids[self._prefix_offset:]
        before = self._tok.decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._tok.decode(window)
        if (text.endswith("\ufffd") and not final) or len(text) <= len(before):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(before):]
