"""Chat prompts tokenized by pieces give the whole prompt's tokens, and repeated turns are not
tokenized again (SmolLM2's real vocabulary, loaded without weights)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from clawctl.engines.llama.tokens import CHECKED_PROMPTS, Overflow, PieceTokenizer

SYSTEM = '<|im_start|>system\nYou are a careful agent. Tools: {"name": "read"}  <|im_end|>\n'
TURNS = [
    "<|im_start|>user\nRead heron.txt, then tell me the code.<|im_end|>\n",
    '<|im_start|>assistant\n<tool_call>\n{"name": "read", "arguments": {"path": "heron.txt"}}\n'
    "</tool_call><|im_end|>\n",
    "<|im_start|>user\n<tool_response>\nThe code is 7319.\n</tool_response><|im_end|>\n",
    "<|im_start|>user\n  Grüße,  naïve café — 東京 🐦\n\n\t<|im_end|>\n",
]


@pytest.fixture(scope="module")
def vocab_only(smollm2_gguf: Path) -> Iterator[llama_cpp.Llama]:
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def whole(llm: llama_cpp.Llama, text: str, add_special: bool = False) -> list[int]:
    return list(llm.tokenize(text.encode(), add_bos=add_special, special=True))


def test_pieces_give_the_whole_prompts_tokens_and_repeats_are_remembered(
    vocab_only: llama_cpp.Llama,
) -> None:
    tokenizer = PieceTokenizer(vocab_only._model.vocab, vocab_only.n_vocab())
    assert tokenizer.trusted
    prompts = [SYSTEM + "".join(TURNS[:n]) + "<|im_start|>assistant\n" for n in range(1, 5)]
    for prompt in [*prompts, *prompts]:  # past the checked prompts, the pieces alone
        assert tokenizer.tokenize(prompt.encode(), False, 4096) == whole(vocab_only, prompt)
    assert tokenizer.trusted
    before = tokenizer.reused
    pieces = tokenizer._split(prompts[-1].encode())
    assert len(pieces) > len(TURNS)  # cut before each control token at least
    tokenizer.tokenize(prompts[-1].encode(), False, 4096)
    assert tokenizer.reused - before == len(pieces)  # seen before: none tokenized again
    with_bos = SYSTEM + TURNS[0]
    assert tokenizer.tokenize(with_bos.encode(), True, 4096) == whole(vocab_only, with_bos, True)


def test_a_prompt_past_the_limit_is_refused_with_its_whole_count(
    vocab_only: llama_cpp.Llama,
) -> None:
    tokenizer = PieceTokenizer(vocab_only._model.vocab, vocab_only.n_vocab())
    prompt = SYSTEM + "".join(TURNS) * 4
    count = len(whole(vocab_only, prompt))
    with pytest.raises(Overflow) as refused:
        tokenizer.tokenize(prompt.encode(), False, count - 1)
    assert refused.value.tokens == count
    assert tokenizer.tokenize(prompt.encode(), False, count) == whole(vocab_only, prompt)


def test_a_vocabulary_whose_pieces_disagree_is_tokenized_whole(
    vocab_only: llama_cpp.Llama,
) -> None:
    tokenizer = PieceTokenizer(vocab_only._model.vocab, vocab_only.n_vocab())
    tokenizer._cut = re.compile(b"e")  # cuts inside words: BPE merges across the cut
    prompts = [SYSTEM + turn for turn in TURNS]
    for prompt in prompts:
        assert tokenizer.tokenize(prompt.encode(), False, 4096) == whole(vocab_only, prompt)
    assert not tokenizer.trusted
    assert tokenizer._checked < CHECKED_PROMPTS  # found out on the first prompt
