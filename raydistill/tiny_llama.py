"""tiny-llama: a random 2-layer Llama with a tokenizer trained on a few lines of text.

Built on the fly (no download), it stands in for a real student in tests and in `make demo`:
every stage runs end to end in seconds on a CPU. Its accuracy means nothing.
"""

from __future__ import annotations

import os
import random


_TINY_TEXT = """\
The quick brown fox jumps over the lazy dog. A student learns to reason step by step from a teacher.
Below is an instruction that describes a task. Write a response that appropriately completes the
request. Let's think step by step. First, add the two numbers. Then subtract the result from the
total. Which of the following is true? Answer with the letter of the correct choice. The answer is
True. The answer is False. The answer is A. There are seven days in a week, twelve months in a
year, sixty minutes in an hour and twenty-four hours in a day. The train leaves the station at noon
and arrives three hours later, so it travels quickly through fields, forests, rivers and mountains.
She read half of the book on Monday and the rest on Tuesday; her brother finished his homework on
Wednesday evening. A rectangle has a length and a width, and its area is their product, while its
perimeter is twice their sum. If each ticket costs five dollars, the total cost is the price times
the number of tickets. People usually keep milk in the refrigerator because cold temperatures slow
the growth of bacteria. Plants need sunlight, water and carbon dioxide to produce sugar and oxygen.
Where would you most likely find a library book: at school, in a kitchen, at the beach, or in a
garage? The moon orbits the earth, and the earth orbits the sun once every year. Heavy rain can
cause floods; strong winds can damage roofs, fences and windows. A farmer planted rows of corn,
beans and potatoes, then sold vegetables at the market every Saturday morning. The teacher divided
the class into groups of four, and every group received paper, scissors, glue and colored markers.
Doctors, nurses, engineers, musicians, painters, writers and scientists all solve problems in their
own way. Multiply the width by the height, divide by two, and compare the fraction with the percent.
Was the bridge built before the war? Could a penguin survive in the desert? Would a whale fit in a
bathtub? Questions like these require common sense, careful thinking and a bit of knowledge.
"""
_TINY_SPECIALS = ("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>")
_TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


_TINY_NAMES = ("Tom", "Anna", "Ben", "Maria", "Chen", "Priya", "Omar", "Lucy", "Sam", "Elena")
_TINY_THINGS = ("apples", "marbles", "books", "pencils", "cookies", "stickers", "coins", "flowers",
                "tickets", "shells", "cards", "eggs", "boxes", "bottles", "candies", "balloons")
_TINY_VERBS = ("buys", "finds", "gives away", "loses", "sells", "eats", "collects", "receives")


def _tiny_corpus(seed: int = 0) -> list[str]:
    """Fixed English sentences plus seeded arithmetic word problems with worked answers."""
    rng = random.Random(seed)
    lines = [line.strip() for line in _TINY_TEXT.splitlines()] * 3
    for _ in range(600):
        who, thing, verb = rng.choice(_TINY_NAMES), rng.choice(_TINY_THINGS), rng.choice(_TINY_VERBS)
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        lines.append(
            f"{who} has {a} {thing} and {verb} {b} more. How many {thing} are there now? "
            f"Step 1: {a} + {b} = {a + b}. The answer is {a + b}."
        )
    return lines


def _train_tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (digits split one by one) trained on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(folder: str | os.PathLike[str], seed: int = 0) -> None:
    """Write a random tiny LlamaForCausalLM and its freshly trained tokenizer to ``folder``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
