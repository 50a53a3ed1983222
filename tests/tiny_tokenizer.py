"""A tiny word-level tokenizer built in memory (no download), matching the 128-token vocabulary of tiny_models.

The approach is the one of ``test_cli._tokenizer``, with two differences: every id in ``[0, 128)`` is a word, so any
token a random model generates decodes to text (answers compared as text are never empty by accident), and the chat
template is optional.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 128
SPECIALS = ["[UNK]", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (2 is the tiny Llama's default eos id)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONTEXT = (
    "the old harbour town had a lighthouse painted blue and a market by the water . "
    "every morning the fishermen sold their catch while the gulls watched from the roofs . "
    "in winter the storms came from the north and the boats stayed in the harbour for days . "
) * 3
QUESTIONS = ["what colour was the lighthouse ?", "who sold the catch ?", "where did the storms come from ?"]


def make_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with exactly ``VOCAB_SIZE`` tokens; with or without a simple chat template."""
    words = sorted(set((CONTEXT + " " + " ".join(QUESTIONS) + " user assistant Question : Answer").split()))
    words += [f"w{i}" for i in range(VOCAB_SIZE - len(SPECIALS) - len(words))]
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    assert len(vocab) == VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
