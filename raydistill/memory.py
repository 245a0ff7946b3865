"""Pre-flight estimate of the memory one training worker needs, from a model config alone.

Model states follow the ZeRO accounting (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", and DeepSpeed's ``estimate_zero2_model_states_mem_needs``):
weights and gradients in the compute dtype, Adam's m and v in fp32, and beside them an fp32 master
copy and fp32 gradient whenever DeepSpeed wraps the optimizer (bf16, or any ZeRO stage). Activations
follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit), recounted for what transformers' layers save
for backward: no dropout, RMSNorm upcasts, gated MLPs, and attention scores only on the eager path,
where the softmax runs in fp32. The pieces are added although they peak at different moments (the
logits early in backward, a layer's attention temporaries later, gradients at the end), so the total
errs high: on CPU in fp32 the measured peak was 0.73-0.96 of it (benchmarks/memory.py). Parameter
counts are exact for BLOOM, Llama and Gemma configs; pass ``parameters=`` for other families.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB  # CUDA context, cuBLAS workspace and NCCL buffers, outside the allocator
FRAGMENTATION = 0.10  # caching-allocator slack on the activation and logit traffic
REDUCE_BUCKET_SIZE = 500_000_000  # configs/deepspeed/zero2.json; ZeRO-1/2 allocate two such buffers
_CLASSIC = {"bloom", "gpt2", "gpt_neox", "gptj", "opt", "phi"}  # LayerNorm, biases, up/down GeLU MLP


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker holds at its peak, by kind."""

    parameters: int  # weights on the device (a 1/N shard plus the gathered layer under ZeRO-3)
    gradients: int  # compute-dtype gradients of trainable weights (sharded under ZeRO>=2)
    optimizer: int  # Adam m, v (+ fp32 master weights and gradients), sharded under ZeRO>=1
    activations: int  # tensors saved for backward, all layers, plus one layer's temporaries
    logits: int  # LM head output through the fp32 cross-entropy and its gradient
    overhead: int  # CUDA context, ZeRO communication buckets, allocator fragmentation; 0 on CPU

    def total(self) -> int:
        return sum(astuple(self))


@dataclass(frozen=True)
class Shape:
    """The numbers of a causal LM config that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated: bool  # gate/up/down MLP (llama, gemma) rather than up/down (BLOOM)
    layer_norm: bool  # LayerNorm with biases (BLOOM) rather than RMSNorm

    @classmethod
    def of(cls, config) -> Shape:
        """Read a transformers `PretrainedConfig` (any family naming: n_embed, n_layer, n_head, ...)."""
        def first(*names, default=None):
            return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)

        hidden = first("hidden_size", "n_embed", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        family = getattr(config, "model_type", "")
        return cls(hidden=hidden, layers=first("num_hidden_layers", "n_layer"), heads=heads,
                   kv_heads=first("num_key_value_heads", default=heads),
                   head_dim=first("head_dim", default=hidden // heads),
                   intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", True)),
                   gated=family not in _CLASSIC, layer_norm=family in _CLASSIC)

    def layer_parameters(self) -> int:
        """Weights of one decoder layer: attention, MLP and its two norms (biases with LayerNorm)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (2 * q + 2 * kv)
        mlp = (3 if self.gated else 2) * self.hidden * self.intermediate
        norms = 2 * self.hidden * (2 if self.layer_norm else 1)
        biases = (q + 2 * kv + self.hidden + self.intermediate + self.hidden) if self.layer_norm else 0
        return attention + mlp + norms + biases

    def parameters(self) -> int:
        """All weights: embeddings (twice when untied), layers, final norm (and BLOOM's embedding norm)."""
        norm = self.hidden * (2 if self.layer_norm else 1)
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_parameters() + norm * (2 if self.layer_norm else 1)


def _norm_bytes(shape: Shape, c: int) -> int:
    """Bytes per token one norm keeps: LayerNorm its input and output (2c per channel); transformers'
    RMSNorm its fp32 upcast, the normalised value and the output (4 + 2c per channel)."""
    return shape.hidden * (2 * c if shape.layer_norm else 4 + 2 * c)


def _layer_bytes_per_token(shape: Shape, c: int, attn: str, seq_len: int) -> int:
    """Bytes one layer saves for backward per token: two norms; q, k, v (k and v repeated to all
    heads except under flash-attention), the output projection's input (and the kernel's own output
    under SDPA/flash); the MLP's intermediates (gated: gate, act(gate), up, product = 4i; plain:
    the GeLU's input and output = 2i). Eager attention also keeps the softmax output in fp32 and its
    cast back to the compute dtype: a*s*(4 + c) bytes (a*s*4 in fp32, where the cast is a no-op)."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    qkv = h + 2 * (kv if attn == "flash_attention_2" else shape.heads * shape.head_dim)
    attention = (qkv + h + (0 if attn == "eager" else h)) * c
    mlp = (4 if shape.gated else 2) * shape.intermediate * c
    scores = shape.heads * seq_len * (4 + (c if c != 4 else 0)) if attn == "eager" else 0
    return 2 * _norm_bytes(shape, c) + attention + mlp + scores


def activation_bytes(shape: Shape, *, micro_batch_size: int, seq_len: int, precision: str,
                     gradient_checkpointing: bool, attn_implementation: str) -> int:
    """Saved activations of all layers and the final norm, plus the temporaries of the layer being
    differentiated: under eager attention two fp32 score-sized buffers (softmax backward's gradient
    in and out) and the (b, 1, s, s) mask. With gradient checkpointing every layer keeps only its
    input (h*c per token) and one layer's full set is rebuilt during backward."""
    c, tokens = _dtype_bytes(precision), micro_batch_size * seq_len
    layer = _layer_bytes_per_token(shape, c, attn_implementation, seq_len)
    kept = shape.hidden * c if gradient_checkpointing else layer
    transient = (8 * shape.heads * seq_len + c * seq_len) if attn_implementation == "eager" else 0
    if gradient_checkpointing:
        transient += layer
    return tokens * (shape.layers * kept + transient + _norm_bytes(shape, c))


def logit_bytes(shape: Shape, *, micro_batch_size: int, seq_len: int, precision: str) -> int:
    """Per logit the largest of: forward, the compute-dtype logits, their fp32 upcast (transformers'
    ForCausalLMLoss calls logits.float()) and log_softmax's fp32 output (c + 8 bytes); start of
    backward, that saved output with the fp32 gradient in and out of log_softmax (12 bytes)."""
    return micro_batch_size * seq_len * shape.vocab * max(_dtype_bytes(precision) + 8, 12)


def estimate_training_memory(config, *, micro_batch_size: int, seq_len: int, precision: str, zero_stage: int,
                             world_size: int, gradient_checkpointing: bool, attn_implementation: str,
                             trainable_parameters: int | None = None, parameters: int | None = None,
                             offload_optimizer: bool = False, offload_param: bool = False,
                             device: str = "cuda", reduce_bucket_size: int = REDUCE_BUCKET_SIZE) -> MemoryEstimate:
    """Peak memory of one worker training `config` with DeepSpeed ZeRO `zero_stage` over `world_size`.

    `parameters` defaults to the count from the config; `trainable_parameters` (LoRA) to all of them.
    Per trainable weight: gradients c bytes (1/N under ZeRO>=2); optimizer 8 bytes (m, v) for plain fp32
    without ZeRO, else 16 (fp32 master, fp32 gradient, m, v; 1/N under ZeRO>=1). ZeRO-3 keeps a 1/N shard
    of the weights plus the largest gathered module at 4 bytes per weight, as DeepSpeed's estimator does.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if attn_implementation not in ("eager", "sdpa", "flash_attention_2"):
        raise ValueError(f"attn_implementation must be eager, sdpa or flash_attention_2, got {attn_implementation!r}")
    if zero_stage not in (0, 1, 2, 3) or world_size < 1:
        raise ValueError(f"zero_stage must be 0-3 and world_size >= 1, got {zero_stage} and {world_size}")
    shape, c, n = Shape.of(config), _dtype_bytes(precision), world_size
    total = parameters if parameters is not None else shape.parameters()
    trainable = total if trainable_parameters is None else trainable_parameters

    weights = total * c
    if zero_stage == 3:
        gathered = 4 * max(shape.layer_parameters(), shape.vocab * shape.hidden)
        weights = (0 if offload_param else weights // n) + gathered
    grads = trainable * c // (n if zero_stage >= 2 else 1)
    adam = trainable * (8 if precision == "fp32" and zero_stage == 0 else 16) // (n if zero_stage >= 1 else 1)
    size = dict(micro_batch_size=micro_batch_size, seq_len=seq_len, precision=precision)
    acts = activation_bytes(shape, gradient_checkpointing=gradient_checkpointing,
                            attn_implementation=attn_implementation, **size)
    logits = logit_bytes(shape, **size)
    overhead = 0
    if device != "cpu":
        buckets = 2 * reduce_bucket_size * (4 if zero_stage == 1 else c) if zero_stage in (1, 2) else 0
        overhead = CUDA_CONTEXT_BYTES + buckets + int(FRAGMENTATION * (acts + logits))
    return MemoryEstimate(parameters=weights, gradients=grads, optimizer=0 if offload_optimizer else adam,
                          activations=acts, logits=logits, overhead=overhead)


def largest_micro_batch(config, *, capacity_bytes: int, global_batch_size: int, world_size: int,
                        **estimate_args) -> int | None:
    """The largest micro-batch dividing global_batch_size / world_size whose estimate fits
    `capacity_bytes`; None when none does (or the global batch does not split over the workers)."""
    if global_batch_size % world_size:
        return None
    per_worker = global_batch_size // world_size
    for micro in sorted((d for d in range(1, per_worker + 1) if per_worker % d == 0), reverse=True):
        estimate = estimate_training_memory(config, micro_batch_size=micro, world_size=world_size, **estimate_args)
        if estimate.total() <= capacity_bytes:
            return micro
    return None


def fits_message(estimate: MemoryEstimate, capacity_bytes: int, suggestion: int | None, what: str) -> str:
    """One line: what `what` needs per GPU, by kind, against the GPU's capacity, and what to change."""
    def gib(n: int) -> str:
        return f"{n / GIB:.1f}"

    labels = {"parameters": "params", "gradients": "grads", "optimizer": "optimizer",
              "activations": "activations", "logits": "logits", "overhead": "overhead"}
    parts = ", ".join(f"{label} {gib(getattr(estimate, name))}" for name, label in labels.items())
    fix = (f"set train.micro_batch_size: {suggestion} (or gradient_checkpointing: true / zero_stage: 3 / "
           "lower cutoff_len)" if suggestion else
           "no micro_batch_size fits: set gradient_checkpointing: true, zero_stage: 3 (with offload), "
           "lower cutoff_len or train with LoRA")
    return (f"{what}: needs about {gib(estimate.total())} GiB per GPU ({parts}) but the GPU has "
            f"{gib(capacity_bytes)} GiB; {fix}")


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


# --------------------------------------------------------------------------- generation (evaluation)


@dataclass(frozen=True)
class GenerationEstimate:
    """Bytes one evaluation engine holds on its GPU at its peak, by kind."""

    weights: int  # all weights in the compute dtype
    kv_cache: int  # keys and values of every layer for every sequence at its full length
    activations: int  # one layer's temporaries of the prefill forward over every sequence's prompt
    logits: int  # a decoding step's last-token logits through the fp32 log-softmax (beam search: + beam scores)
    overhead: int  # CUDA context and allocator fragmentation; 0 on CPU

    def total(self) -> int:
        return sum(astuple(self))


def kv_cache_bytes(shape: Shape, *, sequences: int, tokens: int, precision: str) -> int:
    """Keys and values of every layer: 2 x layers x kv_heads x head_dim x c bytes per token."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * _dtype_bytes(precision) * sequences * tokens


def estimate_generation_memory(config, *, batch_size: int, num_beams: int = 1, num_return_sequences: int = 1,
                               prompt_len: int, max_new_tokens: int, precision: str, attn_implementation: str,
                               parameters: int | None = None, device: str = "cuda") -> GenerationEstimate:
    """Peak memory of one transformers ``generate`` call over `batch_size` left-padded prompts of
    `prompt_len` tokens (the longest) with up to `max_new_tokens` new ones.

    Sequences: batch x num_beams under beam search (``generate`` expands the input before the first
    forward), else batch x num_return_sequences. KV cache: every sequence at prompt_len +
    max_new_tokens, plus one layer's copy (the cache's concatenation and beam search's reordering
    build a layer's new tensor before freeing the old one). Activations: one layer of the prefill
    forward under inference mode: the residual stream, the norm and the q/k/v and output projections
    (5 hidden-sized tensors a token), the MLP's intermediates (gated: 3, else 2), and under eager
    attention the scores with their fp32 softmax and its cast back (c + 4 + c bytes a score). Logits:
    the model returns the last position's only (``logits_to_keep=1``), which a decoding step copies
    to fp32, log-softmaxes and (beam search) adds the beam scores to: (c + 12) bytes a logit. The
    pieces peak at different moments and are added, so the total errs high.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if attn_implementation not in ("eager", "sdpa", "flash_attention_2"):
        raise ValueError(f"attn_implementation must be eager, sdpa or flash_attention_2, got {attn_implementation!r}")
    shape, c = Shape.of(config), _dtype_bytes(precision)
    sequences = batch_size * (num_beams if num_beams > 1 else num_return_sequences)
    weights = (parameters if parameters is not None else shape.parameters()) * c
    tokens = prompt_len + max_new_tokens
    kv = kv_cache_bytes(shape, sequences=sequences, tokens=tokens, precision=precision)
    kv += kv // shape.layers  # one layer's copy while it is concatenated or reordered
    prompt_tokens = sequences * prompt_len
    layer = prompt_tokens * (5 * shape.hidden + (3 if shape.gated else 2) * shape.intermediate) * c
    if attn_implementation == "eager":
        layer += sequences * shape.heads * prompt_len**2 * (2 * c + 4)
    logits = sequences * shape.vocab * (c + 12)
    overhead = 0 if device == "cpu" else CUDA_CONTEXT_BYTES + int(FRAGMENTATION * (kv + layer + logits))
    return GenerationEstimate(weights=weights, kv_cache=kv, activations=layer, logits=logits, overhead=overhead)


def largest_generation_batch(config, *, capacity_bytes: int, batch_size: int, **estimate_args) -> int | None:
    """The largest number of prompts up to `batch_size` whose ``generate`` call fits `capacity_bytes`
    (`estimate_generation_memory`); None when not even one prompt does."""
    fits = [b for b in range(batch_size, 0, -1)
            if estimate_generation_memory(config, batch_size=b, **estimate_args).total() <= capacity_bytes]
    return fits[0] if fits else None


def vllm_minimum_bytes(config, *, max_model_len: int, precision: str, parameters: int | None = None) -> int:
    """What a vLLM engine must fit within ``gpu_memory_utilization`` of its GPU at the least: the
    weights in the compute dtype and the KV cache of one sequence of `max_model_len` tokens (vLLM
    refuses to start otherwise); its activation profile and CUDA graphs come on top."""
    shape = Shape.of(config)
    weights = (parameters if parameters is not None else shape.parameters()) * _dtype_bytes(precision)
    return weights + kv_cache_bytes(shape, sequences=1, tokens=max_model_len, precision=precision)


def gib(n: int) -> str:
    """Bytes as GiB with one decimal."""
    return f"{n / GIB:.1f}"


def by_kind(estimate) -> str:
    """"weights 5.6, kv_cache 20.1, ..." (GiB) of a `MemoryEstimate` or `GenerationEstimate`."""
    return ", ".join(f"{name} {gib(value)}" for name, value in vars(estimate).items())
