"""The HF engine: transformers ``generate`` on a left-padded batch, and what both engines share.

An engine is a Ray Data callable class: built once per actor from a model folder, then called
on batches ``{"prompt": [...], ...}``; it returns the batch with ``generation`` (text cut at the
first stop string), ``tokens_generated`` (new tokens before the first end-of-text token,
`end_token_ids`) and ``empty`` (only whitespace once special tokens are removed) added; the HF
engine also adds its time, ``generate_seconds`` and (first batch) ``load_seconds``, spread over the rows. With
``n_samples > 1`` every input row comes back ``n_samples`` times, one generation each.

`HFEngine` runs on CPU or one GPU per actor, in rounds of `ROUND_TOKENS` new tokens that drop the
rows already finished. `load_tokenizer`, `end_token_ids`, `cut_at_stop`, `is_truncated`, `is_empty` and
`until_end` are shared with the vLLM engine (`raydistill.evaluate.vllm_engine`), so both count and cut generations alike.
"""

from __future__ import annotations

import os
import time

import numpy as np

from raydistill.spec import EvalSpec

# HF engine: new tokens per `generate` call; finished rows leave the batch between calls, so a
# batch no longer decodes until its longest generation ends. 0: one call per batch.
ROUND_TOKENS = int(os.environ.get("RAYDISTILL_HF_ROUND_TOKENS", "64"))


def generate_kwargs(spec: EvalSpec) -> dict:
    """`transformers` generate() arguments for the spec's decoding settings."""
    kwargs = {"max_new_tokens": spec.max_new_tokens, "num_beams": spec.num_beams,
              "do_sample": spec.do_sample, "num_return_sequences": spec.n_samples}
    if spec.do_sample:
        kwargs.update(temperature=spec.temperature, top_p=spec.top_p)
    return kwargs


def load_tokenizer(model_path: str, template_name: str):
    """The model's tokenizer (a LoRA adapter's, else its base's), left-padded, with EOS/pad fixed as
    the student's template trains it."""
    from transformers import AutoTokenizer

    from raydistill.evaluate.models import tokenizer_folder
    from raydistill.students import get_template

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(model_path), padding_side="left")
    get_template(template_name).fix_tokenizer(tokenizer)
    return tokenizer


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """Text before the earliest stop string (the paper's evaluator stops generation there)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut].strip()


def is_truncated(tokens: int, max_new_tokens: int, stopped: bool, empty: bool = False) -> bool:
    """A generation cut by the token budget: ``max_new_tokens`` generated before any end-of-text
    token, no stop string in its text (a stop string on the last token counts as a proper end), and
    some text in it: a generation of special tokens or whitespace only is `is_empty`, not cut."""
    return tokens >= max_new_tokens and not stopped and not empty


def is_empty(generation: str) -> bool:
    """Only whitespace left of a generation once its special tokens are removed and it is cut at the first
    stop string (`cut_at_stop`): nothing to grade."""
    return not generation.strip()


# Tokens that end a text in the tokenizers of the student families we know: a student that emits one
# has finished, whichever of them its chat template trains as end of turn (SmolLM2: <|im_end|> ends a
# turn, <|endoftext|> a document; Llama 3: <|eot_id|>, <|end_of_text|>; Gemma: <end_of_turn>).
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>",
                      "<|end|>", "<end_of_turn>", "<eos>")

def end_token_ids(tokenizer, generation_eos: int | list[int] | None = None) -> set[int]:
    """Every token id that ends a generation: the generation config's EOS ids (``generation_eos``),
    the tokenizer's EOS and pad (as the student's template sets them), and each of the tokenizer's
    special tokens named in `END_OF_TEXT_TOKENS`."""
    eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    ids = {i for i in [*eos, tokenizer.eos_token_id, tokenizer.pad_token_id] if i is not None}
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if token.special and token.content in END_OF_TEXT_TOKENS:
            ids.add(int(token_id))
    return ids


def generation_config_eos(model_path: str) -> int | list[int] | None:
    """The EOS id(s) of a model folder's ``generation_config.json`` (None where it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        return None


def until_end(ids: list[int], end_ids: set[int]) -> list[int]:
    """Generated ids before the first end-of-text id (both engines count tokens this way)."""
    for i, token in enumerate(ids):
        if token in end_ids:
            return ids[:i]
    return ids


def generate_in_sub_batches(generate, prompts: list[str], size: int, round_tokens: int) -> list[list[int]]:
    """`generate` (`HFEngine.generate_ids`) over consecutive sub-batches of `size` prompts, its
    generations concatenated in prompt order: a batch whose generate call would not fit the GPU
    (``eval.generate_batch_size``, set by the sweep from ``eval.gpu_memory_gb``).

    Greedy and beam search give the same tokens as one call up to padding: the batch is left-padded
    to its longest prompt and the attention mask and position ids skip the padding, so a row's
    generation does not depend on its neighbours; a sub-batch pads less, which changes the shapes of
    the matrix products, not what they compute (float rounding aside). Sampling draws from one
    random stream per call (seeded with ``eval.seed``), so its samples change with the split.
    """
    ids: list[list[int]] = []
    for start in range(0, len(prompts), size):
        ids.extend(generate(prompts[start:start + size], round_tokens))
    return ids


class StopOnStrings:
    """Per-sequence stopping criterion: the generated text contains a stop string.

    transformers' own ``stop_strings`` re-indexes the whole vocabulary on every ``generate`` call
    (about 5 s for a 49k vocabulary here), which dominates one-prompt-per-call evaluation.
    """

    def __init__(self, tokenizer, stop_strings: list[str], prompt_len: int, tail: int = 16):
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.prompt_len, self.tail = prompt_len, tail

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, self.prompt_len:][:, -self.tail:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in texts], device=input_ids.device)


class HFEngine:
    """Batched `generate` with a left-padded HF causal LM; one instance per Ray Data actor."""

    def __init__(self, model_path: str, template_name: str, spec: dict, stop_strings: list[str], model=None):
        """``model``: the model of ``model_path`` already in memory (a shared host's LoRA merge,
        `raydistill.evaluate.shared.EngineHost`), cast as loading it would cast it."""
        import torch
        from transformers import AutoModelForCausalLM

        started = time.perf_counter()
        self.spec = EvalSpec.model_validate(spec)
        if not self.spec.resolved:
            raise ValueError("HFEngine needs an EvalSpec resolved for its task (EvalSpec.for_task)")
        self.device = "cuda" if self.spec.use_gpu else "cpu"
        self.tokenizer = load_tokenizer(model_path, template_name)
        dtype = torch.bfloat16 if self.spec.use_gpu else torch.float32
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model = model.to(self.device, dtype).eval()
        self.stop_strings = list(stop_strings)
        self.end_ids = end_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self.load_seconds = time.perf_counter() - started  # goes out with the first batch

    def generate_ids(self, prompts: list[str], round_tokens: int = ROUND_TOKENS) -> list[list[int]]:
        """New token ids per generation (``n_samples`` consecutive entries per prompt).

        Greedy and sampling decode in rounds of ``round_tokens``: after each round the finished
        rows leave the batch and the others continue from their KV cache, so a batch whose
        generations differ in length does less work (greedy: the same tokens as one call). Beam
        search runs in one call. With ``generate_batch_size`` the prompts are generated that many at
        a time (`generate_in_sub_batches`).
        """
        import torch

        size = self.spec.generate_batch_size
        if size and len(prompts) > size:
            return generate_in_sub_batches(self.generate_ids, prompts, size, round_tokens)
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)
        start = ids.shape[1]
        stop = StopOnStrings(self.tokenizer, self.stop_strings, start) if self.stop_strings else None
        kwargs = {**generate_kwargs(self.spec), "pad_token_id": self.tokenizer.pad_token_id,
                  "eos_token_id": sorted(self.end_ids), "stopping_criteria": [stop] if stop else None, "return_dict_in_generate": True}
        one_call = self.spec.num_beams > 1 or round_tokens <= 0
        torch.manual_seed(self.spec.seed)
        results: dict[int, list[int]] = {}
        rows, cache = None, None  # rows: the generation index of each row still in the batch
        while True:
            remaining = self.spec.max_new_tokens - (ids.shape[1] - start)
            step = remaining if one_call else min(round_tokens, remaining)
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                          **{**kwargs, "max_new_tokens": step})
            sequences, cache = out.sequences, out.past_key_values
            if rows is None:  # num_return_sequences expanded the batch in the first round
                rows = list(range(len(sequences)))
                mask = mask.repeat_interleave(len(sequences) // len(prompts), dim=0)
                kwargs["num_return_sequences"] = 1
            last_round = one_call or step == remaining
            done = [True] * len(rows) if last_round else self._finished(sequences, ids.shape[1], stop)
            for i, row in enumerate(rows):
                if done[i]:
                    results[row] = until_end(sequences[i, start:].tolist(), self.end_ids)
            keep = [i for i in range(len(rows)) if not done[i]]
            if not keep:
                return [results[row] for row in range(len(results))]
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
            grown = torch.ones(len(rows), sequences.shape[1] - mask.shape[1], dtype=mask.dtype, device=self.device)
            ids, mask = sequences[keep], torch.cat([mask, grown], dim=1)[keep]
            rows = [rows[i] for i in keep]

    def _finished(self, sequences, round_start: int, stop: StopOnStrings | None) -> list[bool]:
        """Rows that ended in this round: an end-of-text id among its new tokens, or a stop string."""
        ended = [bool(self.end_ids & set(row)) for row in sequences[:, round_start:].tolist()]
        if stop is not None:
            ended = [e or bool(s) for e, s in zip(ended, stop(sequences, None).tolist())]
        return ended

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started, cpu_started = time.perf_counter(), time.process_time()
        ids = self.generate_ids([str(p) for p in batch["prompt"]])
        out = {k: np.repeat(v, self.spec.n_samples, axis=0) for k, v in batch.items()}
        # the actor's time spread over the batch's rows, so any re-batching keeps the sums
        out["generate_seconds"] = np.full(len(ids), (time.perf_counter() - started) / len(ids))
        out["generate_cpu_seconds"] = np.full(len(ids), (time.process_time() - cpu_started) / len(ids))
        out["load_seconds"] = np.full(len(ids), self.load_seconds / len(ids))
        self.load_seconds = 0.0
        raw = [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        out["generation"] = np.array([cut_at_stop(text, self.stop_strings) for text in raw], dtype=object)
        out["tokens_generated"] = np.array([len(i) for i in ids], dtype=np.int64)
        out["empty"] = np.array([is_empty(text) for text in out["generation"]], dtype=bool)
        out["truncated"] = np.array([is_truncated(len(i), self.spec.max_new_tokens,
                                                  any(s in text for s in self.stop_strings), empty)
                                     for i, text, empty in zip(ids, raw, out["empty"])], dtype=bool)
        return out
