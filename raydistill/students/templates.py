"""Prompt templates: how a student sees a question and its training answer.

``alpaca`` (BLOOM), ``gemma`` and ``llama3`` reproduce LLaMA-Factory's templates as the seed
paper trained with them (hiyouga/LLaMA-Factory ``src/llamafactory/data/template.py``, the
v0.9.x layout with ``format_separator``/``efficient_eos`` that was current in early 2025). For
one question and one answer LLaMA-Factory encodes ``prefix + system + user`` as the prompt
and ``assistant`` (+ EOS) as the response, each slot tokenised separately without special
tokens; ``Template.encode`` does the same. ``chat`` uses the tokenizer's own chat template.

Differences worth knowing:

* LLaMA-Factory HEAD (late 2025) changed two single-turn responses: alpaca became
  ``{answer}</s>\\n\\n`` and gemma ``{answer}<end_of_turn>\\n`` (EOS replaced by
  ``<end_of_turn>``). The paper-era form is kept here.
* The paper's evaluator (EIT-NLP/Distilling-CoT-Reasoning,
  ``Evaluation/reasoning_eval/prompt_utils.py``) renders prompts that differ from its own
  training templates: llama3 adds the system message "You are a helpful assistant." and no
  BOS text, alpaca ends with ``### Response: \\n`` (space, no BOS), gemma ends with
  ``<start_of_turn>model\\n\\n``. raydistill evaluates with exactly the training prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from raydistill.answers.thinking import THINK_MARKERS
from raydistill.students.errors import StudentError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Template(Protocol):
    """Renders prompts and training pairs for one prompt format."""

    name: str
    think_markers: tuple[str, str]  # around a reasoning trace in a response (`raydistill.answers.thinking`)

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        """The inference prompt: everything the model sees before its answer."""

    def pair(
        self, question: str, response: str, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[str, str]:
        """(prompt, response text ending with the end-of-turn/EOS string) for training."""

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, question: str, response: str | None = None
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids), each encoded without extra special tokens."""

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, ...]:
        """Strings that end a generation whatever the protocol: the family's end strings, the EOS.
        The paper's stop lists are part of each task's evaluation protocol (`raydistill.tasks`)."""

    def fix_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Adjust EOS/pad before training, as LLaMA-Factory does for this template."""


def _fill(slot: str, content: str) -> str:
    return slot.replace("{content}", content)  # not str.format: questions may contain braces


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        if text:
            ids += tokenizer.encode(text, add_special_tokens=False)
    return ids


def _with_eos(strings: tuple[str, ...], tokenizer: PreTrainedTokenizerBase | None) -> tuple[str, ...]:
    extra = (tokenizer.eos_token,) if tokenizer is not None and tokenizer.eos_token else ()
    return tuple(dict.fromkeys(strings + extra))


@dataclass(frozen=True)
class SlotTemplate:
    """A fixed template in LLaMA-Factory's slot form; ``{content}`` marks where text goes.

    Prompt = ``prefix`` (the BOS text) + ``system`` filled with ``default_system`` (if any)
    + ``user`` filled with the question. Response = answer + ``end_of_turn``.
    """

    name: str
    user: str
    end_of_turn: str
    prefix: str = ""
    system: str = "{content}"
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False  # LLaMA-Factory makes ``end_of_turn`` the tokenizer's EOS
    think_markers: tuple[str, str] = THINK_MARKERS

    def _prompt_texts(self, question: str) -> list[str]:
        system = _fill(self.system, self.default_system) if self.default_system else ""
        return [self.prefix, system, _fill(self.user, question)]

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        return "".join(self._prompt_texts(question))

    def pair(
        self, question: str, response: str, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[str, str]:
        return self.prompt(question), response + self.end_of_turn

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, question: str, response: str | None = None
    ) -> tuple[list[int], list[int]]:
        prompt_ids = _encode_texts(tokenizer, self._prompt_texts(question))
        if response is None:
            return prompt_ids, []
        return prompt_ids, _encode_texts(tokenizer, [response, self.end_of_turn])

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, ...]:
        return _with_eos(self.stop_words, tokenizer)

    def fix_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Set EOS and pad as LLaMA-Factory does before training (and saving) a student."""
        if self.replace_eos and tokenizer.eos_token != self.end_of_turn:
            tokenizer.add_special_tokens({"eos_token": self.end_of_turn})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own chat template (``tokenizer.apply_chat_template``)."""

    name: str = "chat"
    think_markers: tuple[str, str] = THINK_MARKERS

    @staticmethod
    def _require(tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
        if tokenizer is None:
            raise ValueError("the 'chat' template needs the student's tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; "
                f"pick a fixed template ({', '.join(n for n in TEMPLATES if n != 'chat')})"
            )
        return tokenizer

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        messages = [{"role": "user", "content": question}]
        return self._require(tokenizer).apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def pair(
        self, question: str, response: str, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> tuple[str, str]:
        prompt = self.prompt(question, tokenizer)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
        full = self._require(tokenizer).apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} does not render the answer after "
                "its generation prompt; pick a fixed template instead of 'chat'"
            )
        return prompt, full[len(prompt) :]

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, question: str, response: str | None = None
    ) -> tuple[list[int], list[int]]:
        if response is None:
            return _encode_texts(tokenizer, [self.prompt(question, tokenizer)]), []
        prompt, answer = self.pair(question, response, tokenizer)
        return _encode_texts(tokenizer, [prompt]), _encode_texts(tokenizer, [answer])

    def stop_strings(self, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[str, ...]:
        return _with_eos((), tokenizer)

    def fix_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Give the tokenizer a pad token if it has none."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token


# LLaMA-Factory v0.9.x, src/llamafactory/data/template.py:
#   alpaca: format_user "### Instruction:\n{{content}}\n\n### Response:\n", default_system
#           "Below is ... the request.\n\n", format_separator "\n\n" (between turns only),
#           assistant "{{content}}" + eos_token.  BLOOM's EOS is "</s>".
#   gemma:  format_prefix bos_token, format_user "<start_of_turn>user\n{{content}}<end_of_turn>\n
#           <start_of_turn>model\n", efficient_eos (EOS "<eos>" appended after the last answer).
#   llama3: format_prefix bos_token, no default system, format_user "<|start_header_id|>user
#           <|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>
#           \n\n", assistant "{{content}}" + eos_token with replace_eos (EOS := "<|eot_id|>"),
#           stop_words ["<|eot_id|>", "<|eom_id|>"].
TEMPLATES: dict[str, Template] = {
    "alpaca": SlotTemplate(
        name="alpaca",
        user="### Instruction:\n{content}\n\n### Response:\n",
        end_of_turn="</s>",
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
        ),
        stop_words=("</s>",),
    ),
    "gemma": SlotTemplate(
        name="gemma",
        user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
        end_of_turn="<eos>",
        prefix="<bos>",
        stop_words=("<eos>", "<end_of_turn>"),
    ),
    "llama3": SlotTemplate(
        name="llama3",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        end_of_turn="<|eot_id|>",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        stop_words=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
        replace_eos=True,
    ),
    "chat": ChatTemplate(),
}


def get_template(name: str) -> Template:
    """The template registered under ``name``."""
    if name not in TEMPLATES:
        raise StudentError(f"unknown template {name!r}; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
