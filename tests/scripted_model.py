"""A Llama whose greedy generation is scripted: after any prompt it emits a given chain of tokens.

Built from tiny-llama's tokenizer (with extra special tokens added where a test needs them): the
attention and MLP outputs are zero, so every position's hidden state is its own token's embedding
and the model is a bigram table; ``lm_head`` maps each token of the chain to the next. The engines
under test run it as any other student: nothing in them knows it is scripted.
"""

from __future__ import annotations

from pathlib import Path


def build_scripted_model(folder: Path, source: Path, chain: list[str], special_tokens: tuple[str, ...] = ()) -> Path:
    """Save to ``folder`` a model that, after a prompt ending in the chat template's generation
    prompt, emits the tokens ``chain`` (token strings, each different) and then repeats the last.

    ``source``: a tiny-llama folder (its tokenizer and config); ``special_tokens``: added to the
    tokenizer as special tokens first (e.g. ``<|endoftext|>``)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source)
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    config = LlamaConfig.from_pretrained(source)
    config.vocab_size, config.tie_word_embeddings = len(tokenizer), False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False,
                                           add_generation_prompt=True)
    start = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    ids = [start, *tokenizer.convert_tokens_to_ids(chain)]
    assert tokenizer.unk_token_id not in ids[1:] and len(set(ids)) == len(ids), f"chain tokens must exist and differ: {chain}"
    with torch.no_grad():
        for layer in model.model.layers:  # no attention or MLP output: the residual stream is the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = torch.nn.functional.normalize(model.model.embed_tokens.weight, dim=1)
        model.model.embed_tokens.weight.copy_(embed)
        model.lm_head.weight.zero_()
        for src, dst in zip(ids, [*ids[1:], ids[-1]]):
            model.lm_head.weight[dst] += 10 * embed[src]
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
