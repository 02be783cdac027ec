"""Tiny random Qwen3.5 HF models built with transformers + CPU torch (shared by the tests)."""

from __future__ import annotations

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=16,
            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_conv_kernel_dim=4, max_position_embeddings=512, eos_token_id=1,
            pad_token_id=0)


def build_hf_model(seed: int = 0, **overrides):
    """A random ``Qwen3_5ForCausalLM`` in fp32 with every parameter (norms, decays) perturbed."""
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    config = Qwen3_5TextConfig(**{**TINY, **overrides})
    model = Qwen3_5ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty_like(param).uniform_(0.5, 8.0).log())
            elif name.endswith("dt_bias"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif "norm" in name:
                param.copy_(0.2 * torch.randn_like(param) + (1.0 if "linear_attn.norm" in name
                                                              else 0.0))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    return model
