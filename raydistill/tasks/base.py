"""What a task entry holds, and the paper's two evaluation protocols.

A `Task` is the single source of truth for one dataset: its training files in the release
(through their names in LLaMA-Factory's ``dataset_info.json``), its test file and how to read it,
its grader, the paper's evaluation protocol, the exemplar family of its teacher prompts and the
form of its answer-only training targets. `raydistill.tasks` collects one entry per module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol as TypingProtocol, Union

Field = Union[str, Callable[[dict], Any]]  # a column name, or a function of the row


class Grader(TypingProtocol):
    """Extracts an answer from a model's output and compares it with a gold answer
    (`raydistill.answers`)."""

    def extract(self, text: str, options: Any = ...) -> str | None: ...

    def normalize_gold(self, raw: Any) -> str: ...

    def equal(self, pred: str, gold: str, options: Any = ...) -> bool: ...


@dataclass(frozen=True)
class TestSet:
    """How to read a task's test file into (question, rationale, answer)."""

    __test__ = False  # not a pytest class

    path: str  # relative data path (an upstream path, see raydistill.datasets)
    question: Field
    answer: Field
    rationale: Field | None = None  # None: ""
    minus_train: bool = False  # drop questions of the task's training files (SVAMP)


@dataclass(frozen=True)
class EvalProtocol:
    """How the paper evaluated a task: decoding, length and stop strings, and where that comes from."""

    num_beams: int  # 1: greedy
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    source: str


# MAmmoTH2 math_eval/run_open.py (9c67cb1): SamplingParams(temperature=0, top_p=1,
# max_tokens=model_max_length, stop=stop_tokens); the seed README runs it with --shots 0
# --model_max_length 1024 --dtype bfloat16.
MATH_PROTOCOL = EvalProtocol(
    num_beams=1,
    max_new_tokens=1024,
    stop_strings=("USER:", "ASSISTANT:", "### Instruction:", "Response:", "\n\nProblem", "\nProblem",
                  "Problem:", "<|eot_id|>", "####"),
    source="greedy, 1024 new tokens: MAmmoTH2 math_eval/run_open.py (SamplingParams temperature=0, "
           "top_p=1, max_tokens=model_max_length) run as the seed README says (--shots 0 --model_max_length 1024)",
)

# Seed repository Evaluation/reasoning_eval/run_reasoning.py: SamplingParams(temperature=0,
# use_beam_search=True, best_of=5, max_tokens=max_length, stop=stop_tokens); autoevaluate.py
# passes --model_max_length 640 --dtype bfloat16.
COMMONSENSE_PROTOCOL = EvalProtocol(
    num_beams=5,
    max_new_tokens=640,
    stop_strings=("USER:", "ASSISTANT:", "### Instruction:", "Response:", "<start_of_turn>", "[INST]",
                  "\n\nProblem", "\nProblem", "Problem:", "<|eot_id|>", "####"),
    source="beam search width 5, 640 new tokens: seed Evaluation/reasoning_eval/run_reasoning.py "
           "(SamplingParams temperature=0, use_beam_search=True, best_of=5) with autoevaluate.py's "
           "--model_max_length 640",
)


@dataclass(frozen=True)
class Task:
    """One dataset of the study."""

    name: str
    kind: Literal["math", "commonsense"]
    release_names: tuple[str, ...]  # prefixes of its entries in the release's dataset_info.json
    test: TestSet
    grader: Grader
    protocol: EvalProtocol
    exemplars: str  # family of the one-shot teacher exemplar (raydistill/data/prompts/exemplars/<family>.yaml)
    answer_only_target: str = "The answer is {answer}."  # the target an answer-only student learns

    def answer_only(self, answer: str) -> str:
        """The answer-only training target for a released answer, in the form the grader reads."""
        return self.answer_only_target.format(answer=str(answer).strip())
