"""A reduced Qwen3-Next-80B-A3B shape for one 80 GB GPU (benchmarks, random init): the released
widths (hidden 2048; 16 query / 2 KV heads of 256, partial RoPE; Gated DeltaNet with 16 key / 32
value heads of 128; experts of width 512, top-10, a shared expert of width 512; vocabulary 151,936)
with 4 layers (one [linear x3, full] group) and 128 experts instead of 48 layers and 512.

Memory arithmetic (training keeps fp32 weights + AdamW moments + fp32 gradients = 16 B per
parameter, and the step casts the weights to bf16, +2 B):
- one layer's 512 experts hold 512 x 3 x 2048 x 512 = 1.61 B parameters; at 4 layers the real
  expert count alone is 6.4 B parameters = 103 GB of state: it does not fit, at any depth >= 1
  with the 0.62 B embedding + LM head next to it beyond 2 layers;
- with 128 experts: a layer's experts are 0.40 B, the layer 0.44 B (linear) / 0.43 B (full);
  4 layers 1.75 B + embedding and untied LM head 0.62 B = 2.37 B parameters, 38 GB of state +
  4.7 GB of bf16 weights; activations with remat at batch 1 x 2048 (FLARE: 4096 positions):
  the logits 4096 x 151936 x 6 B = 3.7 GB plus one layer being recomputed: about 50 GB in all.
The active compute per token is the real model's (top-10 of width 512 + shared expert; routing
to 128 experts instead of 512 gives each expert 4x more tokens, i.e. larger grouped matmuls than
the real model would see at the same batch).
"""

import ml_collections

from flare_jax.train.config import default_config

LAYERS = 4
EXPERTS = 128


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model.hf_config = ml_collections.ConfigDict(dict(
        model_type="qwen3_next", vocab_size=151936, hidden_size=2048,
        intermediate_size=5632,  # the dense MLP width (HF default); unused: every layer is sparse
        num_hidden_layers=LAYERS, full_attention_interval=4, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        num_experts=EXPERTS, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], router_aux_loss_coef=0.001, rms_norm_eps=1e-6,
        max_position_embeddings=262144, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0,
                             partial_rotary_factor=0.25),
        eos_token_id=151645, pad_token_id=151643))
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.scan_layers = True  # 4 layers form one group: no repeat, they run unrolled
    c.block_size = 32
    c.data.seq_len = 2048
    c.data.global_batch_size = 8
    c.optimizer.learning_rate = 1e-5
    c.optimizer.weight_decay = 0.01
    c.train.steps = 1000
    return c
