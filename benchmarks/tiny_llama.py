"""A random-init 6-layer Llama with SmolLM2's tokenizer, saved as an HF directory: sweeps on it measure Ray and
our code, not matmuls."""

from __future__ import annotations


def tiny_llama(out: str, num_layers: int = 6) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ray_prune.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=num_layers,
                                  max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out
