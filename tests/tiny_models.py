"""Tiny random Qwen3.5-family HF models built with transformers + CPU torch (shared by the tests)."""

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
    return perturb_parameters(Qwen3_5ForCausalLM(config).eval())


def perturb_parameters(model):
    """Give every parameter of a fresh HF model random values (norms, decays included)."""
    import torch

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


# Sparse families, three layers (linear, full, linear) to keep compiles short: 8 experts, top-2, a
# shared expert; Qwen3-Next keeps a dense MLP in layer 2 and uses unnormalised top-k weights,
# Qwen3.5-MoE (no intermediate_size) has experts in every layer.
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
           shared_expert_intermediate_size=32, num_hidden_layers=3,
           layer_types=["linear_attention", "full_attention", "linear_attention"])
TINY_NEXT = {**TINY, **MOE, "mlp_only_layers": [2], "norm_topk_prob": False}
TINY_MOE = {k: v for k, v in {**TINY, **MOE}.items() if k != "intermediate_size"}


def build_hf_moe_model(family: str, seed: int = 0, **overrides):
    """A random ``Qwen3NextForCausalLM`` (family "qwen3_next") or ``Qwen3_5MoeForCausalLM``
    ("qwen3_5_moe") in fp32 with every parameter perturbed."""
    import torch
    import transformers

    config_cls, model_cls, base = {
        "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", TINY_NEXT),
        "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", TINY_MOE),
    }[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**base, **overrides})
    return perturb_parameters(getattr(transformers, model_cls)(config).eval())


TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)


def vlm_from_text(config_cls, model_cls, text_fields: dict, text_model):
    """A vision-language wrapper (``model_cls(config_cls(...))``, a tiny vision tower) whose
    language model and LM head carry ``text_model``'s weights."""
    import torch

    config = config_cls(text_config=dict(text_fields), vision_config=dict(TINY_VISION))
    vlm = model_cls(config).eval()
    with torch.no_grad():
        for name, param in text_model.model.named_parameters():
            vlm.model.language_model.get_parameter(name).copy_(param)
        vlm.lm_head.weight.copy_(text_model.lm_head.weight)
    return vlm
