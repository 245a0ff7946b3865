"""Does every trial fit its GPUs? Decided at sweep start, before any GPU node is asked for.

`check_fit` estimates, for every trial whose spec declares a GPU memory (``train.gpu_memory_gb``,
``eval.gpu_memory_gb``; GiB as torch reports a GPU's memory), what its training needs per GPU at
its longest batch (`raydistill.memory.estimate_training_memory`: micro_batch_size x the cell's
longest tokenized training sequence, with the student's own tokenizer and template) and what its
evaluation needs per GPU (`raydistill.memory.estimate_generation_memory`: batch x beams (x samples)
sequences of the longest test prompt plus max_new_tokens; for vLLM the weights and one
max_model_len sequence within gpu_memory_utilization). Then:

- training that does not fit is refused in one line naming the trial, the estimate by kind and the
  limit; with ``train.fit: adjust`` it gets the largest micro-batch that fits (more gradient
  accumulation, the same global batch) instead, which the trial is identified and run with;
- an HF evaluation whose batch does not fit is generated in sub-batches that do
  (``eval.generate_batch_size``; the same predictions); one where even a single prompt does not fit,
  or a vLLM engine that cannot hold its weights and one sequence, is refused.

Longest sequences are computed once per (student, cell) and (student, task), not per trial. Each
trial's decision is written to the trial record (``fit``) and all of them to ``<run>/fit.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from raydistill import files
from raydistill.memory import GIB, by_kind, gib
from raydistill.spec import EvalSpec, SpecError, TrialSpec

log = logging.getLogger("raydistill.sweep")

FIT_FILE = "fit.json"  # every trial's estimates and decisions, written at sweep start


class Sizes:
    """The longest sequences the estimates need, each computed once: training sequences per
    (student, cell, cutoff), test prompts per (student, task)."""

    def __init__(self, model_paths: dict[str, str], cells: dict, test_paths: dict[str, Path]):
        self.model_paths, self.cells, self.test_paths = model_paths, cells, test_paths
        self._configs: dict[str, object] = {}
        self._train: dict[tuple, int] = {}
        self._prompt: dict[tuple, int] = {}

    def config(self, student: str):
        from transformers import AutoConfig

        if student not in self._configs:
            self._configs[student] = AutoConfig.from_pretrained(self.model_paths[student])
        return self._configs[student]

    def job(self, trial: TrialSpec):
        from raydistill.train import TrainJob

        return TrainJob(student=trial.student, model_path=self.model_paths[trial.student],
                        data_path=self.cells[trial.cell]["train_path"], run_name="fit", storage_path=".",
                        spec=trial.train)

    def longest_train(self, trial: TrialSpec) -> int:
        from raydistill.train import longest_sequence

        key = (trial.student, trial.cell.cell_hash, trial.train.cutoff_len, trial.train.overlong)
        if key not in self._train:
            self._train[key] = longest_sequence(self.job(trial), trial.train)
        return self._train[key]

    def longest_prompt(self, student: str, task: str) -> int:
        """Tokens of the longest test prompt as the engines see it (the student's template, no
        special tokens added)."""
        import pyarrow.parquet as pq

        from raydistill.evaluate.hf_engine import load_tokenizer
        from raydistill.evaluate.run import build_prompts
        from raydistill.students import get_student, get_template

        key = (student, task)
        if key not in self._prompt:
            name = get_student(student).template
            tokenizer = load_tokenizer(self.model_paths[student], name)
            prompts = build_prompts(pq.read_table(self.test_paths[task]), get_template(name), tokenizer)
            self._prompt[key] = max(len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"])
                                    for p in prompts)
        return self._prompt[key]


def check_fit(trials: list[TrialSpec], labels: list[str], sizes: Sizes,
              run_dir: Path | None = None) -> tuple[list[TrialSpec], list[dict | None]]:
    """Each trial as it will run (micro-batch adjusted, generate sub-batch set) and its fit record
    (None where it declares no GPU memory). Raises SpecError, one line, for the first trial that
    cannot fit (the others that cannot either are counted in it and listed in ``<run>/fit.json``)."""
    checked, records, refused = [], [], []
    for trial, label in zip(trials, labels):
        record: dict = {}
        problems: list[str] = []
        if trial.train.gpu_memory_gb:
            trial = _fit_training(trial, label, sizes, record, problems)
        if trial.eval.gpu_memory_gb:
            trial = _fit_evaluation(trial, label, sizes, record, problems)
        checked.append(trial)
        records.append(record or None)
        if problems:
            record["refused"] = problems
            refused.append(problems[0])
    if run_dir is not None and any(records):
        files.write_json(run_dir / FIT_FILE, [{"trial": label, **(r or {})} for label, r in zip(labels, records)],
                         indent=1)
    if refused:
        more = (f" ({len(refused) - 1} more trials do not fit either; see {run_dir / FIT_FILE})"
                if len(refused) > 1 and run_dir is not None else "")
        raise SpecError(refused[0] + more)
    return checked, records


def _fit_training(trial: TrialSpec, label: str, sizes: Sizes, record: dict, problems: list[str]) -> TrialSpec:
    from raydistill import memory
    from raydistill.train.memory_check import describe_run, estimate_args

    spec = trial.train
    capacity = int(spec.gpu_memory_gb * GIB)
    longest = sizes.longest_train(trial)
    job = sizes.job(trial)
    config, args = estimate_args(job, spec, longest, sizes.config(trial.student))
    world = spec.num_workers
    estimate = memory.estimate_training_memory(config, micro_batch_size=spec.micro_batch_size, world_size=world,
                                               **args)
    record["train"] = {"longest_sequence": longest, "micro_batch_size": spec.micro_batch_size,
                       "estimate_bytes": estimate.total(), "by_kind": vars(estimate).copy(),
                       "limit_bytes": capacity, "fits": estimate.total() <= capacity}
    if estimate.total() <= capacity:
        return trial
    micro = memory.largest_micro_batch(config, capacity_bytes=capacity, global_batch_size=spec.global_batch_size,
                                       world_size=world, **args)
    what = f"trial {label}: {describe_run(job, spec, longest)}"
    if spec.fit != "adjust" or micro is None:
        line = memory.fits_message(estimate, capacity, micro, what)
        problems.append(line + ("; or train.fit: adjust" if micro else ""))
        return trial
    adjusted = spec.model_copy(update={"micro_batch_size": micro})
    after = memory.estimate_training_memory(config, micro_batch_size=micro, world_size=world, **args)
    record["train"].update(adjusted_micro_batch_size=micro, grad_accum_steps=[spec.grad_accum_steps,
                                                                              adjusted.grad_accum_steps],
                           adjusted_estimate_bytes=after.total())
    log.info("trial %s: train.fit adjust: micro_batch_size %d -> %d, gradient accumulation %d -> %d steps "
             "(global batch %d); about %s GiB per GPU instead of %s, train.gpu_memory_gb %s GiB",
             label, spec.micro_batch_size, micro, spec.grad_accum_steps, adjusted.grad_accum_steps,
             spec.global_batch_size, gib(after.total()), gib(estimate.total()), gib(capacity))
    return trial.model_copy(update={"train": adjusted})


def _engines(spec: EvalSpec) -> set[str]:
    """The engines the evaluation may run on (``auto`` with greedy decoding: either, decided later
    on the engine nodes)."""
    if spec.engine == "hf" or (spec.num_beams or 1) > 1:
        return {"hf"}
    return {"vllm"} if spec.engine == "vllm" else {"hf", "vllm"}


def _fit_evaluation(trial: TrialSpec, label: str, sizes: Sizes, record: dict, problems: list[str]) -> TrialSpec:
    from raydistill import memory
    from raydistill.evaluate.vllm_engine import model_max_len, vllm_max_model_len
    from raydistill.students import get_student

    spec = trial.eval
    capacity = int(spec.gpu_memory_gb * GIB)
    config = sizes.config(trial.student)
    precision = "bf16" if spec.use_gpu else "fp32"
    prompt = sizes.longest_prompt(trial.student, trial.cell.dataset)
    engines = _engines(spec)
    record["eval"] = {"longest_prompt": prompt, "engines": sorted(engines), "limit_bytes": capacity}
    if "vllm" in engines:
        context = vllm_max_model_len(spec, prompt, model_max_len(sizes.model_paths[trial.student]))
        need = memory.vllm_minimum_bytes(config, max_model_len=context, precision=precision) // \
            spec.tensor_parallel_size
        allowed = int(spec.gpu_memory_utilization * capacity)
        record["eval"]["vllm"] = {"max_model_len": context, "estimate_bytes": need, "allowed_bytes": allowed,
                                  "fits": need <= allowed}
        if need > allowed:
            problems.append(f"trial {label}: eval on vllm needs at least {gib(need)} GiB per GPU (weights and the KV "
                            f"cache of one {context}-token sequence) but gpu_memory_utilization "
                            f"{spec.gpu_memory_utilization:g} of the GPU's {gib(capacity)} GiB is {gib(allowed)} "
                            "GiB; raise eval.tensor_parallel_size or gpu_memory_utilization, or set eval.engine: hf")
    if "hf" not in engines:
        return trial
    args = dict(num_beams=spec.num_beams or 1, num_return_sequences=spec.n_samples, prompt_len=prompt,
                max_new_tokens=spec.max_new_tokens, precision=precision,
                attn_implementation=get_student(trial.student).attention or "sdpa",
                device="cuda")
    batch = spec.generate_batch_size or spec.batch_size
    estimate = memory.estimate_generation_memory(config, batch_size=batch, **args)
    record["eval"]["hf"] = {"batch": batch, "estimate_bytes": estimate.total(), "by_kind": vars(estimate).copy(),
                            "fits": estimate.total() <= capacity}
    if estimate.total() <= capacity:
        return trial
    fitting = memory.largest_generation_batch(config, capacity_bytes=capacity, batch_size=batch, **args)
    sequences = batch * (args["num_beams"] if args["num_beams"] > 1 else spec.n_samples)
    if fitting is None:
        problems.append(f"trial {label}: eval on hf needs about {gib(estimate.total())} GiB per GPU "
                        f"({by_kind(estimate)}) for {batch} prompts ({sequences} sequences of {prompt} + "
                        f"{spec.max_new_tokens} tokens) and more than {gib(capacity)} GiB (eval.gpu_memory_gb) even "
                        "for one prompt; lower max_new_tokens or evaluate on a larger GPU")
        return trial
    after = memory.estimate_generation_memory(config, batch_size=fitting, **args)
    record["eval"]["hf"].update(generate_batch_size=fitting, adjusted_estimate_bytes=after.total())
    log.info("trial %s: eval on hf: %d prompts (%d sequences of %d + %d tokens) need about %s GiB per GPU, over "
             "eval.gpu_memory_gb %s: generating %d prompts at a time (about %s GiB)", label, batch, sequences, prompt,
             spec.max_new_tokens, gib(estimate.total()), gib(capacity), fitting, gib(after.total()))
    return trial.model_copy(update={"eval": spec.model_copy(update={"generate_batch_size": fitting})})
