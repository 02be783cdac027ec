"""Names and layouts of HF tensors <-> flare-jax parameters (Qwen3.5, Qwen3.5-MoE, Qwen3-Next).

Parameters are addressed by tuples of strings (the checkpoint's nested-dict keys). HF linear weights
are ``[out, in]``; ours are ``kernel [in, out]``. The conv weight ``[C, 1, K]`` is ours ``[K, C]``.
HF stores routed experts one tensor per expert (``experts.<e>.gate_proj.weight [I, hidden]``);
ours are stacked (``experts/gate_proj [E, hidden, I]``). Qwen3-Next fuses the linear-attention
input projections per key-head group (``in_proj_qkvz``, ``in_proj_ba``); ours are the separate
Qwen3.5 projections, so the model code is the same for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flare_jax.checkpoint import param_group
from flare_jax.config import FULL, QWEN3_NEXT, ModelConfig

VLM_TEXT_PREFIX = "model.language_model."
# Weights that are not part of the text model: the vision tower and multi-token-prediction heads.
SKIPPED_PREFIXES = ("model.visual.", "mtp.", "model.mtp.")

Path = tuple[str, ...]


@dataclass(frozen=True)
class HFTensor:
    """One HF tensor: its name (text-only layout) and shape."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorMap:
    """HF tensors <-> flare-jax parameters of one conversion rule.

    Kinds: ``dense`` (one ``[out, in]`` weight <-> one kernel), ``conv``, ``plain`` (same layout),
    ``experts`` (one weight per expert <-> one stacked parameter) and ``fused`` (one weight whose
    rows hold ``groups`` repetitions of ``pieces``; piece ``j`` of every group belongs to kernel
    ``owners[j]``, which holds its pieces in order, each group-major).
    """

    kind: str
    hf: tuple[HFTensor, ...]
    paths: tuple[Path, ...]
    groups: int = 1
    pieces: tuple[int, ...] = ()
    owners: tuple[int, ...] = ()

    @property
    def group(self) -> str:
        """The parameter save group (one per decoder layer) of this rule's parameters."""
        return param_group(self.paths[0])


def expected_maps(config: ModelConfig) -> list[TensorMap]:
    """Every text tensor the config implies, as conversion rules in checkpoint order."""
    c = config
    maps = [_single("plain", ("embed_tokens",), "model.embed_tokens.weight",
                    (c.vocab_size, c.hidden_size))]
    for i, layer_type in enumerate(c.layer_types):
        layer: Path = ("layers", str(i))
        maps += [_vector(layer, "input_layernorm", c.hidden_size),
                 _vector(layer, "post_attention_layernorm", c.hidden_size)]
        if layer_type == FULL:
            attn = (*layer, "self_attn")
            qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            maps += [_dense(attn, "q_proj", 2 * qd, c.hidden_size),
                     _dense(attn, "k_proj", kvd, c.hidden_size),
                     _dense(attn, "v_proj", kvd, c.hidden_size),
                     _dense(attn, "o_proj", c.hidden_size, qd),
                     _vector(attn, "q_norm", c.head_dim), _vector(attn, "k_norm", c.head_dim)]
        else:
            lin = (*layer, "linear_attn")
            hv = c.linear_num_value_heads
            maps += _linear_projections(c, lin)
            maps += [_single("conv", (*lin, "conv_weight"), f"{_hf_layer(lin)}conv1d.weight",
                             (c.linear_conv_dim, 1, c.linear_conv_kernel_dim)),
                     _single("plain", (*lin, "dt_bias"), f"{_hf_layer(lin)}dt_bias", (hv,)),
                     _single("plain", (*lin, "A_log"), f"{_hf_layer(lin)}A_log", (hv,)),
                     _vector(lin, "norm", c.linear_value_head_dim),
                     _dense(lin, "out_proj", c.hidden_size, c.linear_value_dim)]
        mlp = (*layer, "mlp")
        maps += _moe(c, mlp) if c.is_moe_layer(i) else _swiglu(mlp, c.hidden_size,
                                                               c.intermediate_size)
    maps.append(_vector((), "norm", c.hidden_size))
    if not c.tie_word_embeddings:
        maps.append(_single("dense", ("lm_head", "kernel"), "lm_head.weight",
                            (c.vocab_size, c.hidden_size)))
    return maps


def hf_tensors(maps: list[TensorMap]) -> list[HFTensor]:
    """The HF tensors of ``maps``, in order."""
    return [t for m in maps for t in m.hf]


def _hf_layer(prefix: Path) -> str:
    return "model." + "".join(f"{p}." for p in prefix)


def _single(kind: str, path: Path, hf_name: str, hf_shape: tuple[int, ...]) -> TensorMap:
    return TensorMap(kind, (HFTensor(hf_name, hf_shape),), (path,))


def _dense(prefix: Path, name: str, out_f: int, in_f: int) -> TensorMap:
    return _single("dense", (*prefix, name, "kernel"), f"{_hf_layer(prefix)}{name}.weight",
                   (out_f, in_f))


def _vector(prefix: Path, name: str, size: int) -> TensorMap:
    return _single("plain", (*prefix, name, "weight"), f"{_hf_layer(prefix)}{name}.weight", (size,))


def _swiglu(prefix: Path, hidden: int, intermediate: int) -> list[TensorMap]:
    return [_dense(prefix, "gate_proj", intermediate, hidden),
            _dense(prefix, "up_proj", intermediate, hidden),
            _dense(prefix, "down_proj", hidden, intermediate)]


def _linear_projections(c: ModelConfig, lin: Path) -> list[TensorMap]:
    """The input projections of a linear-attention layer (fused per key head for Qwen3-Next)."""
    hv = c.linear_num_value_heads
    if c.model_type != QWEN3_NEXT:
        return [_dense(lin, "in_proj_qkv", c.linear_conv_dim, c.hidden_size),
                _dense(lin, "in_proj_z", c.linear_value_dim, c.hidden_size),
                _dense(lin, "in_proj_b", hv, c.hidden_size),
                _dense(lin, "in_proj_a", hv, c.hidden_size)]
    groups, dk = c.linear_num_key_heads, c.linear_key_head_dim
    per_group = hv // groups
    wv = per_group * c.linear_value_head_dim
    kernels = [(*lin, n, "kernel") for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")]
    return [TensorMap("fused", (HFTensor(f"{_hf_layer(lin)}in_proj_qkvz.weight",
                                         (c.linear_conv_dim + c.linear_value_dim, c.hidden_size)),),
                      tuple(kernels[:2]), groups, (dk, dk, wv, wv), (0, 0, 0, 1)),
            TensorMap("fused", (HFTensor(f"{_hf_layer(lin)}in_proj_ba.weight",
                                         (2 * hv, c.hidden_size)),),
                      tuple(kernels[2:]), groups, (per_group, per_group), (0, 1))]


def _moe(c: ModelConfig, mlp: Path) -> list[TensorMap]:
    """Router, stacked routed experts, shared expert and its gate."""
    h, inter = c.hidden_size, c.moe_intermediate_size
    experts = (*mlp, "experts")

    def stacked(name: str, shape: tuple[int, int]) -> TensorMap:
        hf = tuple(HFTensor(f"{_hf_layer(experts)}{e}.{name}.weight", shape)
                   for e in range(c.num_experts))
        return TensorMap("experts", hf, ((*experts, name),))

    return [_dense(mlp, "gate", c.num_experts, h),
            stacked("gate_proj", (inter, h)), stacked("up_proj", (inter, h)),
            stacked("down_proj", (h, inter)),
            *_swiglu((*mlp, "shared_expert"), h, c.shared_expert_intermediate_size),
            _dense(mlp, "shared_expert_gate", 1, h)]


def to_ours(m: TensorMap, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """HF tensors of ``m`` (in ``m.hf`` order) -> our parameters (in ``m.paths`` order)."""
    if m.kind == "dense":
        return [np.ascontiguousarray(arrays[0].T)]
    if m.kind == "conv":
        return [np.ascontiguousarray(arrays[0][:, 0, :].T)]
    if m.kind == "experts":
        return [np.stack([a.T for a in arrays])]
    if m.kind == "fused":
        rows = arrays[0].reshape(m.groups, sum(m.pieces), -1)
        parts = np.split(rows, np.cumsum(m.pieces)[:-1], axis=1)
        return [np.ascontiguousarray(np.concatenate(
            [p.reshape(-1, p.shape[-1]) for p, o in zip(parts, m.owners, strict=True) if o == k]).T)
            for k in range(len(m.paths))]
    return [arrays[0]]


def to_hf(m: TensorMap, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Inverse of :func:`to_ours`."""
    if m.kind == "dense":
        return [np.ascontiguousarray(arrays[0].T)]
    if m.kind == "conv":
        return [np.ascontiguousarray(arrays[0].T[:, None, :])]
    if m.kind == "experts":
        return [np.ascontiguousarray(a.T) for a in arrays[0]]
    if m.kind == "fused":
        parts: list[np.ndarray] = []
        for k, kernel in enumerate(arrays):
            widths = [m.groups * p for p, o in zip(m.pieces, m.owners, strict=True) if o == k]
            rows = np.split(kernel.T, np.cumsum(widths)[:-1], axis=0)
            parts += [r.reshape(m.groups, -1, r.shape[-1]) for r in rows]
        # ``parts`` follows owner order; put the pieces back in their order within a group.
        order = sorted(range(len(m.pieces)), key=lambda j: (m.owners[j], j))
        by_piece = dict(zip(order, parts, strict=True))
        fused = np.concatenate([by_piece[j] for j in range(len(m.pieces))], axis=1)
        return [np.ascontiguousarray(fused.reshape(-1, fused.shape[-1]))]
    return [arrays[0]]


def text_layout_name(hf_name: str) -> str:
    """Name of a tensor in the text-only layout (``model.language_model.X`` -> ``model.X``)."""
    if hf_name.startswith(VLM_TEXT_PREFIX):
        return "model." + hf_name[len(VLM_TEXT_PREFIX):]
    return hf_name
