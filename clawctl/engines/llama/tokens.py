"""Tokenizing chat prompts a piece at a time, remembering the pieces an agent sends every call.

An agent's call is ~50k characters of chat template output, 99% of it the same as its last call
(the system prompt, the tools, the history). llama.cpp tokenizes all of it again each time: 40
ms for OpenClaw's 12k tokens on a 2-core x86, more on a Pi, all before the first new token is
computed. llama.cpp's tokenizer first cuts the text at its special tokens and encodes each piece
of text between them on its own, so a prompt cut just before each control token (`<|im_start|>`
...) tokenizes, piece by piece, to exactly the tokens of the whole; `PieceTokenizer` does that
and keeps recent pieces' tokens, so a call tokenizes only the turns that are new.

Whether a vocabulary really cuts that way (an SPM tokenizer's space prefix, a control token that
strips the whitespace before it) is checked rather than assumed: the first few prompts are also
tokenized whole, and a model whose pieces disagree with the whole once is tokenized whole from
then on (logged)."""

from __future__ import annotations

import logging
import re
import threading
from array import array
from collections import OrderedDict
from typing import Any

import llama_cpp

log = logging.getLogger("clawd.engine")

# Prompts tokenized both ways before the pieces are trusted alone.
CHECKED_PROMPTS = 3
# Pieces remembered (a turn each) and their text in all: OpenClaw's prompt is ~50 KB, so this
# keeps dozens of sessions' turns in a few MB (tokens as 4-byte ints, not Python objects).
MAX_PIECES = 1024
MAX_PIECE_BYTES = 4 << 20


class Overflow(Exception):
    """More tokens than the caller's limit (`tokens`: the count, or a lower bound)."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


class PieceTokenizer:
    """Special-token-aware tokenizing (`llama_tokenize(..., parse_special=True)`) of one
    vocabulary, with recent pieces remembered. Thread-safe: the preparer thread and the model
    thread both tokenize."""

    def __init__(self, vocab: Any, n_vocab: int) -> None:
        self._vocab = vocab
        self._cut = _control_pattern(vocab, n_vocab)
        self._pieces: OrderedDict[bytes, array[int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._checked = 0
        self.trusted = self._cut is not None
        self.reused = 0  # pieces found remembered (for tests and logs)

    def tokenize(self, text: bytes, add_special: bool, limit: int) -> list[int]:
        """The tokens of `text`, at most `limit` of them (else `Overflow`)."""
        if not self.trusted or self._cut is None:
            return self._whole(text, add_special, limit)
        tokens: list[int] = []
        try:
            for index, piece in enumerate(self._split(text)):
                tokens.extend(self._piece(piece, add_special and index == 0, limit - len(tokens)))
        except Overflow:
            return self._whole(text, add_special, limit)  # raises it with the whole count
        if self._checked < CHECKED_PROMPTS:
            self._check(text, add_special, limit, tokens)
        return tokens

    def _split(self, text: bytes) -> list[bytes]:
        assert self._cut is not None
        starts = [0, *(m.start() for m in self._cut.finditer(text) if m.start() > 0)]
        return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]

    def _piece(self, piece: bytes, add_special: bool, limit: int) -> list[int]:
        if add_special:  # the BOS a vocabulary adds goes to the first piece only: not shared
            return self._whole(piece, True, limit)
        with self._lock:
            found = self._pieces.get(piece)
            if found is not None:
                self._pieces.move_to_end(piece)
                self.reused += 1
        if found is None:
            found = array("i", self._whole(piece, False, max(limit, 0)))
            self._remember(piece, found)
        if len(found) > limit:
            raise Overflow(len(found))
        return found.tolist()

    def _remember(self, piece: bytes, tokens: array[int]) -> None:
        if len(piece) > MAX_PIECE_BYTES // 4:
            return
        with self._lock:
            if piece not in self._pieces:
                self._pieces[piece] = tokens
                self._bytes += len(piece)
            while len(self._pieces) > MAX_PIECES or self._bytes > MAX_PIECE_BYTES:
                old, _ = self._pieces.popitem(last=False)
                self._bytes -= len(old)

    def plain(self, text: bytes, add_special: bool, limit: int) -> list[int]:
        """The tokens of text whose special-token names are text (a raw completion prompt)."""
        return self._whole(text, add_special, limit, special=False)

    def _whole(self, text: bytes, add_special: bool, limit: int, special: bool = True) -> list[int]:
        ids = (llama_cpp.llama_token * max(limit, 1))()
        count = int(
            llama_cpp.llama_tokenize(self._vocab, text, len(text), ids, limit, add_special, special)
        )
        if count < 0:  # llama.cpp counted them all but writes only what fits
            raise Overflow(-count)
        return list(ids[:count])

    def _check(self, text: bytes, add_special: bool, limit: int, tokens: list[int]) -> None:
        whole = self._whole(text, add_special, limit)
        with self._lock:
            self._checked += 1
            if whole != tokens:
                self.trusted = False
                log.warning("this vocabulary does not tokenize by pieces; tokenizing whole")
        if whole != tokens:
            tokens[:] = whole


def _control_pattern(vocab: Any, n_vocab: int) -> re.Pattern[bytes] | None:
    """Where a prompt may be cut: before any control token that leaves the whitespace before
    it alone (longest first, as llama.cpp matches them)."""
    texts: set[bytes] = set()
    control, lstrip = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
    for token in range(n_vocab):
        attr = int(llama_cpp.llama_vocab_get_attr(vocab, token))
        if attr & control and not attr & lstrip:
            text = llama_cpp.llama_vocab_get_text(vocab, token)
            if text:
                texts.add(bytes(text))
    if not texts:
        return None
    return re.compile(b"|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))
