"""Teacher annotation: chain-of-thought rationales from any litellm model, on Ray Data.

Pipeline (one Ray Data job for every cell of a run)::

    questions (EXAMPLE_SCHEMA) -> prompt (level, format, one-shot; raydistill.prompts)
      -> request key = sha256(model, messages, sampling params[, sample index])   [driver]
      -> cached response?  (durable request cache, JSON Lines shards)  [driver]
      -> actor pool (map_batches, async UDF): rate limiter (shared Ray actor) -> litellm.acompletion
         with retries -> append to this actor's cache shard -> extract + verify (raydistill.answers)
      -> cell rows (ANNOTATION_SCHEMA) written to Parquet as results arrive           [driver]
      -> examples.parquet (EXAMPLE_SCHEMA, the samples the policy keeps) + summary.json

Durability: every completed response is appended to the cache as soon as it arrives, so a
rerun after a crash sends no request that had completed. Rows that fail after all retries are
written with their error (never dropped) and are not cached: a finished cell is reused as it is,
and ``--retry-failed`` runs it again, sending only its failed rows.

API keys are read from the environment only (``TeacherSpec.api_key_env`` or the provider's usual
variable such as OPENAI_API_KEY / GEMINI_API_KEY). No key is stored in a spec, a Parquet file, the
cache, a summary or a log line; error messages are scrubbed of the key.

Entry points: ``annotate(spec, out_dir) -> AnnotationResult`` (one cell),
``annotate_cells([(spec, out_dir), ...]) -> AnnotationRun`` (many cells, one pipeline), and
``raydistill annotate --config x.yaml`` (``main``).

Parts: the specs live in the config layer (`raydistill.spec.annotation`); `cache` (request cache),
`ratelimit` (shared token buckets), `teacher` (the litellm-calling actor), `questions` (questions,
padding, hybrid levels), `selection` (which of a question's samples the policy keeps), `cells` (one
cell's rows and outputs), `spend` (the spending cap), `batch` (provider batch APIs), `pipeline` (the Ray Data driver), `cli`
(`raydistill annotate`).
"""

import os

# litellm downloads its model cost map at import unless told to use the bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from raydistill.annotate.cache import CacheWriteError, RequestCache, prompt_hash, request_key  # noqa: E402
from raydistill.annotate.cells import AnnotationResult, AnnotationRun  # noqa: E402
from raydistill.annotate.cli import main, spent_usd, summary_table  # noqa: E402
from raydistill.annotate.pipeline import annotate, annotate_cells, cache_write_error_in  # noqa: E402
from raydistill.annotate.questions import load_questions  # noqa: E402
from raydistill.datasets.tables import pad_rationale  # noqa: E402
from raydistill.annotate.ratelimit import RateLimiter, TokenBucket  # noqa: E402
from raydistill.annotate.spend import SpendCapReached  # noqa: E402
from raydistill.annotate.teacher import TeacherCaller  # noqa: E402
from raydistill.spec.annotation import (  # noqa: E402
                                        AnnotateConfig,
                                        AnnotationSpec,
                                        BatchSpec,
                                        HybridSpec,
                                        PaddingSpec,
                                        Policy,
                                        QuestionsSpec,
                                        RuntimeSpec,
                                        TeacherSpec,
                                        load_config,
)

__all__ = [
    "AnnotateConfig", "AnnotationResult", "AnnotationRun", "AnnotationSpec", "BatchSpec", "CacheWriteError", "HybridSpec",
    "PaddingSpec", "Policy", "QuestionsSpec", "RateLimiter", "RequestCache", "RuntimeSpec", "SpendCapReached",
    "TeacherCaller", "TeacherSpec", "TokenBucket", "annotate", "annotate_cells", "cache_write_error_in", "load_config",
    "load_questions", "main", "pad_rationale", "prompt_hash", "request_key", "spent_usd", "summary_table",
]
