"""What the sweep-start fit check (raydistill.sweep.fit) estimates for the paper's grid: the seven
paper students x seven tasks at the settings of cluster/sweep-cluster.yaml, training per GPU at the
longest training sequence and evaluation per GPU at the longest test prompt, with what fits an L40S
48 GB (44.4 GiB) and an A100 40 GB (39.4 GiB). Prints JSON (one row per student and task).

    RAYDISTILL_DATA_DIR=../shared/data python benchmarks/fit_table.py > outputs/fit-table.json

Offline, without the students' tokenizers, sequence lengths come from stand-in tokenizers (the
sweep itself counts with each student's own): Llama-3.2 with tiktoken's cl100k_base (Llama 3's
tokenizer is cl100k_base's 100k tokens and pre-tokenizer plus 28k tokens for other languages), Gemma
with cl100k_base and every digit a token of its own (Gemma's SentencePiece splits digits), BLOOM the
same (the most tokens of the stand-ins: its 250k byte-level BPE was not available to measure); the
template's special strings count one token each. Where the
offline data mirror lacks the sweep's cells (GPT-4o on GSM8K, AQuA and CSQA), the longest sequence of
the task's released cells of other teachers stands in (`train_source` says which). Model shapes are
the students' hub configs (tests/test_memory.py, PAPER_STUDENTS).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODES = {"L40S 48GB": 44.4, "A100 40GB": 39.4}  # GiB as torch reports the GPU's memory
# family -> (tiktoken encoding, every digit its own token). BLOOM's own count is not known here: of the
# stand-ins, cl100k_base with digits split gives the most tokens on MATH (1,850 against 1,379 for
# GPT-2's p50k_base), so BLOOM's figures are that upper side.
STAND_INS = {"bloom": ("cl100k_base", True), "gemma": ("cl100k_base", True), "llama3": ("cl100k_base", False)}
TASKS = ["svamp", "gsm8k", "aqua", "math", "csqa", "obqa", "strategyqa"]
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>", "</s>"]


class StandIn:
    """``encode(text, add_special_tokens=False)`` as the templates call it: a tiktoken encoding, the
    template's special strings one token each, optionally every digit a token of its own."""

    def __init__(self, encoding: str, split_digits: bool):
        import tiktoken

        self.encoding, self.split_digits = tiktoken.get_encoding(encoding), split_digits
        self.name = encoding + (" with digits split" if split_digits else "")
        self._special = re.compile("(" + "|".join(map(re.escape, SPECIALS)) + ")")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        for part in self._special.split(text):
            if part in SPECIALS:
                ids.append(0)
            elif part and self.split_digits:
                for chunk in re.split(r"(\d)", part):
                    if chunk:
                        ids += self.encoding.encode(chunk, disallowed_special=())
            elif part:
                ids += self.encoding.encode(part, disallowed_special=())
        return ids


def _tiktoken_cache() -> None:
    """tiktoken's encodings from the copies litellm ships (no download)."""
    import importlib.util

    litellm = Path(importlib.util.find_spec("litellm").origin).parent  # found, not imported (it goes online)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(litellm / "litellm_core_utils" / "tokenizers"))


def _longest_train(task: str, tokenizer, template, cutoff: int) -> tuple[int, str]:
    """The longest tokenized sequence of the task's GPT-4o cells (levels 1-6), or where the mirror has
    none of them, of the other teachers' released cells; with where it came from."""
    from raydistill.datasets import load_train
    from raydistill.train import tokenize_examples

    for teachers in (["chatgpt"], ["gemini", "llama"]):
        longest, found = 0, []
        for teacher in teachers:
            for level in range(1, 7):
                try:
                    rows = load_train(task, teacher, level=level).select(["question", "rationale"]).to_pylist()
                except Exception:  # noqa: BLE001 - a cell the offline mirror does not have
                    continue
                examples, _ = tokenize_examples(rows, tokenizer, template, cutoff)
                longest = max([longest, *(len(e["input_ids"]) for e in examples)])
                found.append(f"{teacher} L{level}")
        if found:
            return longest, ", ".join(found)
    return 0, "none"


def rows() -> list[dict]:
    sys.path.insert(0, str(REPO / "tests"))
    from test_memory import PAPER_STUDENTS

    from raydistill import memory
    from raydistill.datasets import load_test
    from raydistill.spec import load_sweep
    from raydistill.students import get_student, get_template

    _tiktoken_cache()
    spec = load_sweep(REPO / "cluster" / "sweep-cluster.yaml")
    train = spec.train
    out, cache = [], {}
    for student, config in PAPER_STUDENTS.items():
        entry = get_student(student)
        template = get_template(entry.template)
        tokenizer = StandIn(*STAND_INS[entry.family])
        attn = entry.attention or "sdpa"
        for task in TASKS:
            key = (entry.family, task)
            if key not in cache:
                longest, source = _longest_train(task, tokenizer, template, train.cutoff_len)
                prompt = max(len(tokenizer.encode(template.prompt(q))) for q in load_test(task)["question"].to_pylist())
                cache[key] = longest, source, prompt
            longest, source, prompt = cache[key]
            args = dict(seq_len=longest, precision=train.precision, zero_stage=train.zero_stage,
                        gradient_checkpointing=bool(train.gradient_checkpointing), attn_implementation=attn)
            est = memory.estimate_training_memory(config, micro_batch_size=train.micro_batch_size,
                                                  world_size=train.num_workers, **args)
            ev = spec.eval.for_task(task)
            gen = dict(num_beams=ev.num_beams, num_return_sequences=ev.n_samples, prompt_len=prompt,
                       max_new_tokens=ev.max_new_tokens, precision="bf16", attn_implementation=attn)
            hf = memory.estimate_generation_memory(config, batch_size=ev.batch_size, **gen)
            context = -(-(prompt + ev.max_new_tokens) // 256) * 256
            vllm = memory.vllm_minimum_bytes(config, max_model_len=context, precision="bf16")
            row = {"student": student, "task": task, "tokenizer": tokenizer.name, "train_source": source,
                   "longest_train_tokens": longest, "micro_batch_size": train.micro_batch_size,
                   "train_gib": round(est.total() / memory.GIB, 2),
                   "train_by_kind_gib": {k: round(v / memory.GIB, 2) for k, v in vars(est).items()},
                   "longest_prompt_tokens": prompt, "num_beams": ev.num_beams, "max_new_tokens": ev.max_new_tokens,
                   "eval_batch": ev.batch_size, "eval_hf_gib": round(hf.total() / memory.GIB, 2),
                   "eval_hf_by_kind_gib": {k: round(v / memory.GIB, 2) for k, v in vars(hf).items()},
                   "vllm_max_model_len": context, "vllm_minimum_gib": round(vllm / memory.GIB, 2), "nodes": {}}
            for node, capacity_gib in NODES.items():
                capacity = int(capacity_gib * memory.GIB)
                micro = memory.largest_micro_batch(config, capacity_bytes=capacity,
                                                   global_batch_size=train.global_batch_size,
                                                   world_size=train.num_workers, **args)
                sub = memory.largest_generation_batch(config, capacity_bytes=capacity, batch_size=ev.batch_size, **gen)
                row["nodes"][node] = {
                    "train_fits": est.total() <= capacity, "adjusted_micro_batch_size": micro,
                    "adjusted_train_gib": round(memory.estimate_training_memory(
                        config, micro_batch_size=micro, world_size=train.num_workers, **args).total() / memory.GIB,
                        2) if micro else None,
                    "eval_hf_fits": hf.total() <= capacity, "generate_batch_size": sub,
                    "vllm_fits": vllm <= ev.gpu_memory_utilization * capacity}
            out.append(row)
    return out


if __name__ == "__main__":
    print(json.dumps(rows(), indent=1))
