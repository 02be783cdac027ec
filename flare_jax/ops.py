"""The model's entry points to the kernels: one function per op, backend resolved by the kernel API.

Model code calls these and never branches on the platform. Under a mesh (``jax.set_mesh``, as the
train step traces) each op runs per shard (``shard_map``): rows split over the batch axes, heads
over the head axes where they divide. Left to the partitioner, a Pallas kernel (an opaque custom
call) would instead be fed the gathered global arrays on every device.

Every op's output is named :data:`OP_OUTPUT` (and the kernels name their custom VJPs' residuals,
``pallas_kernels.residuals``), so that a remat policy can keep what a kernel's forward made
instead of running the kernel again in the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from pallas_kernels.block_attention import api as attention_api
from pallas_kernels.block_attention.mask import TokenLayout
from pallas_kernels.causal_conv import api as causal_conv_api
from pallas_kernels.causal_conv.reference import HeadNorm
from pallas_kernels.gated_delta import api as gated_delta_api
from pallas_kernels.gated_delta.api import GatedDeltaInputs
from pallas_kernels.grouped_matmul import api as grouped_matmul_api
from pallas_kernels.row_softmax import api as row_softmax_api

BATCH_AXES = ("data", "fsdp", "expert")  # mesh axes that split the batch
HEAD_AXES = ("tensor",)  # mesh axes that split attention and linear-attention heads
OP_OUTPUT = "op_output"  # the name of every op's output (remat policies)


def _split_axes(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...] | None:
    present = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    if not present or size % math.prod(mesh.shape[a] for a in present):
        return None
    return present


def _named(fn: Callable) -> Callable:
    """``fn`` with its outputs named :data:`OP_OUTPUT`."""
    return lambda *args, **kwargs: checkpoint_name(fn(*args, **kwargs), OP_OUTPUT)


def _per_shard(fn: Callable, batch: int, heads: tuple[int, ...],
               specs: Callable[[object, object], tuple[tuple, object]]) -> Callable:
    """``fn`` under the current mesh's ``shard_map`` (``fn`` itself without a mesh), its
    outputs named :data:`OP_OUTPUT`: ``specs(b, h) -> (in_specs, out_specs)`` places the batch
    axes ``b`` and head axes ``h`` (None where they do not divide ``batch`` / every entry of
    ``heads``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _named(fn)
    b = _split_axes(BATCH_AXES, batch, mesh)
    head_splits = [_split_axes(HEAD_AXES, n, mesh) for n in heads]
    h = head_splits[0] if head_splits and None not in head_splits else None
    if b is None and h is None:
        return _named(fn)
    in_specs, out_specs = specs(b, h)
    return _named(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                check_vma=False))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_layout: TokenLayout,
              kv_layout: TokenLayout, *, backend: str = "auto") -> jax.Array:
    """Softmax attention under the FLARE visibility rule of the two layouts (GQA by head groups)."""
    def run(q, k, v, q_layout, kv_layout):
        return attention_api.block_attention(q, k, v, q_layout, kv_layout, backend=backend)

    def specs(b, h):
        heads, rows = P(b, None, h, None), P(b, None)
        return (heads, heads, heads, rows, rows), heads

    return _per_shard(run, q.shape[0], (q.shape[2], k.shape[2]), specs)(
        q, k, v, q_layout, kv_layout)


def causal_conv_silu(x: jax.Array, weight: jax.Array, segment_ids: jax.Array, *,
                     context: jax.Array | None = None, clean: jax.Array | None = None,
                     block_size: int | None = None, l2_heads: tuple[int, int] | None = None,
                     split_at: tuple[int, ...] | None = None, backend: str = "auto"
                     ) -> jax.Array | tuple[jax.Array, ...]:
    """The Gated DeltaNet's depthwise causal conv + SiLU over ``x [B, T, C]`` (document-aware,
    decoding ``context``, FLARE handoff from ``clean``); channels split like heads.
    ``l2_heads = (head_dim, channels)``: the heads of ``head_dim`` channels among the first
    ``channels`` (q and k) come out l2-normalised. ``split_at``: the output as the parts of its
    channels that start there (q, k, v), written apart by the kernels unless the channels are
    split over devices (then split after)."""
    conv = _ConvShards.of(x, l2_heads, split_at)

    def run(x, weight, segment_ids, context, clean, channel_ids):
        return causal_conv_api.causal_conv_silu(
            x, weight, segment_ids, context=context, clean=clean, block_size=block_size,
            norm=conv.norm(channel_ids), split_at=conv.kernel_split, backend=backend)

    def specs(b, h):
        stream = P(b, None, h)
        return ((stream, P(None, h), P(b, None), None if context is None else stream,
                 None if clean is None else stream, P(h)), conv.out_spec(stream))

    out = _per_shard(run, x.shape[0], (conv.heads,), specs)(x, weight, segment_ids, context,
                                                           clean, conv.channel_ids)
    return conv.split(out)


def causal_conv_silu_pair(row: jax.Array, weight: jax.Array, segment_ids: jax.Array, *,
                          block_size: int, l2_heads: tuple[int, int] | None = None,
                          split_at: tuple[int, ...] | None = None, backend: str = "auto"
                          ) -> tuple[jax.Array | tuple[jax.Array, ...], ...]:
    """Both FLARE streams' convs over the packed ``row [B, 2T, C] = [clean ; noisy]``:
    ``(causal_conv_silu(clean, ...), causal_conv_silu(noisy, ..., clean=clean,
    block_size=block_size))`` as one op, whose GPU kernels read the halves in place and sum the
    clean half's gradient from both streams in one pass (``causal_conv_api.causal_conv_silu_pair``)."""
    conv = _ConvShards.of(row, l2_heads, split_at)

    def run(row, weight, segment_ids, channel_ids):
        return causal_conv_api.causal_conv_silu_pair(
            row, weight, segment_ids, block_size=block_size, norm=conv.norm(channel_ids),
            split_at=conv.kernel_split, backend=backend)

    def specs(b, h):
        stream = P(b, None, h)
        out = conv.out_spec(stream)
        return (stream, P(None, h), P(b, None), P(h)), (out, out)

    outs = _per_shard(run, row.shape[0], (conv.heads,), specs)(
        row, weight, segment_ids, conv.channel_ids)
    return tuple(conv.split(out) for out in outs)


class _ConvShards(NamedTuple):
    """How the conv's channels split over devices: whole heads per shard (``heads`` counted as
    the l2-normalised heads' width, or single channels), the output parts written by the
    kernels (``kernel_split``, None when the channels are split over devices) or after."""

    channel_ids: jax.Array
    heads: int
    l2_heads: tuple[int, int] | None
    split_at: tuple[int, ...] | None
    kernel_split: tuple[int, ...] | None

    @classmethod
    def of(cls, x: jax.Array, l2_heads: tuple[int, int] | None,
           split_at: tuple[int, ...] | None) -> _ConvShards:
        channels = x.shape[2]
        heads = channels if l2_heads is None else channels // l2_heads[0]
        mesh = jax.sharding.get_abstract_mesh()
        sharded = not mesh.empty and _split_axes(HEAD_AXES, heads, mesh) is not None
        return cls(jnp.arange(channels, dtype=jnp.int32), heads, l2_heads, split_at,
                   None if sharded else split_at)

    def norm(self, channel_ids: jax.Array) -> HeadNorm | None:
        """The shard's normalisation: its first channel decides which of its heads."""
        if self.l2_heads is None:
            return None
        return HeadNorm(self.l2_heads[0], self.l2_heads[1] - channel_ids[0])

    def out_spec(self, stream: P) -> P | tuple[P, ...]:
        return stream if self.kernel_split is None else (stream,) * (len(self.kernel_split) + 1)

    def split(self, out):
        if self.split_at is not None and self.kernel_split is None:
            return tuple(jnp.split(out, self.split_at, axis=-1))
        return out


MAX_CHUNK = 32
MIN_CHUNK = 16  # the GPU kernels' smallest tile


def chunk_for_length(length: int) -> int:
    """Chunk of the gated delta scan for ``length`` tokens: :data:`MAX_CHUNK`, or the smallest
    power of two (at least 16) holding a shorter call whole, so that a decoding pass over a few
    tokens does not prepare a chunk that is mostly padding. 32 rather than 64: the causal train
    step is 2.4% faster on the H100 (docs/performance.md, "On the H100; the head's logsumexp
    kernel and bf16 logits")."""
    return min(MAX_CHUNK, max(MIN_CHUNK, 1 << max(length - 1, 0).bit_length()))


def gated_delta(inputs: GatedDeltaInputs, *, segment_ids: jax.Array,
                initial_state: jax.Array | None = None, backend: str = "auto"
                ) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule over one stream with document resets; returns ``(o, final_state)``."""
    chunk = chunk_for_length(segment_ids.shape[1])

    def run(inputs, segment_ids, initial_state):
        return gated_delta_api.gated_delta_rule(*inputs, segment_ids=segment_ids,
                                                initial_state=initial_state, chunk_size=chunk,
                                                backend=backend)

    def specs(b, h):
        state = P(b, h, None, None)
        return ((_gated_delta_specs(b, h), P(b, None), None if initial_state is None else state),
                (P(b, None, h, None), state))

    return _per_shard(run, segment_ids.shape[0], (inputs.k.shape[2], inputs.v.shape[2]), specs)(
        inputs, segment_ids, initial_state)


def gated_delta_handoff(clean: GatedDeltaInputs, noisy: GatedDeltaInputs, *, segment_ids: jax.Array,
                        block_size: int, backend: str = "auto") -> tuple[jax.Array, jax.Array]:
    """FLARE handoff: noisy blocks start from the clean state at their block boundary.

    Returns ``(o_clean, o_noisy)``.
    """
    def run(clean, noisy, segment_ids):
        o_clean, o_noisy, _ = gated_delta_api.gated_delta_rule_handoff(
            clean, noisy, block_size=block_size, segment_ids=segment_ids, backend=backend)
        return o_clean, o_noisy

    def specs(b, h):
        inputs, out = _gated_delta_specs(b, h), P(b, None, h, None)
        return (inputs, inputs, P(b, None)), (out, out)

    return _per_shard(run, segment_ids.shape[0], (clean.k.shape[2], clean.v.shape[2]), specs)(
        clean, noisy, segment_ids)


def _gated_delta_specs(b, h) -> GatedDeltaInputs:
    """Specs of ``(q, k, v [B, T, H, D], g, beta [B, T, H])``."""
    heads = P(b, None, h, None)
    return GatedDeltaInputs(heads, heads, heads, P(b, None, h), P(b, None, h))


class VocabSoftmax(NamedTuple):
    """A cross-entropy's softmax terms over logits ``[B, C, V]`` whose vocabulary is split ``S``
    ways (1 without tensor parallelism): on each shard's columns,
    ``softmax - onehot(targets) = norm * exp``."""

    exp: jax.Array | None  # [B, C, V]: exp(logits - the shard's row offset), target column replaced
    norm: jax.Array | None  # [B, C, S] fp32: exp(offset - lse) of each shard
    lse: jax.Array  # [B, C] fp32
    target_logit: jax.Array  # [B, C] fp32


def vocab_softmax(logits: jax.Array, targets: jax.Array, *, exp_dtype: jnp.dtype | None = None,
                  backend: str = "auto") -> VocabSoftmax:
    """The logsumexp and target logit of ``logits [B, C, V]`` (any float dtype, read once) at
    ``targets [B, C]`` (ids in ``[0, V)``), and with ``exp_dtype`` the gradient terms
    ``norm * exp = softmax - onehot`` (``exp`` in ``exp_dtype``, written once; its target column
    formed in fp32). Rows split over the batch axes. With the vocabulary split over the head axes
    (tensor parallelism) each shard works on its columns, offset by its own row offsets (hence
    one ``norm`` per shard), and the logsumexps are combined (max, then a sum of ``exp``)."""
    mesh = jax.sharding.get_abstract_mesh()
    vocab_axes = None if mesh.empty else _split_axes(HEAD_AXES, logits.shape[2], mesh)

    def run(logits: jax.Array, targets: jax.Array) -> VocabSoftmax:
        batch, chunk, vocab = logits.shape
        rows = logits.reshape(-1, vocab)
        first = 0 if vocab_axes is None else jax.lax.axis_index(vocab_axes) * vocab
        local = targets.reshape(-1) - first
        owned = (local >= 0) & (local < vocab)
        picked = jnp.take_along_axis(rows, jnp.where(owned, local, 0)[:, None], axis=1)[:, 0]
        target = jnp.where(owned, picked.astype(jnp.float32), -jnp.inf)
        # the target's logit is the offset hint: no overflow where the target is the max
        terms = row_softmax_api.row_softmax(rows, target, exp_dtype=exp_dtype, backend=backend)
        lse = terms.lse
        if vocab_axes is not None:
            top = jax.lax.pmax(lse, vocab_axes)
            lse = top + jnp.log(jax.lax.psum(jnp.exp(lse - top), vocab_axes))
            target = jax.lax.pmax(target, vocab_axes)  # -inf but on the owner

        def shaped(x: jax.Array, *tail: int) -> jax.Array:
            return x.reshape(batch, chunk, *tail)

        if exp_dtype is None:
            return VocabSoftmax(None, None, shaped(lse), shaped(target))
        # softmax - 1 at the target, over norm: exp(x_t - offset) - exp(lse - offset), in fp32
        offset = terms.offset
        column = (jnp.exp(target - offset) - jnp.exp(lse - offset)).astype(exp_dtype)
        exp = terms.exp.at[jnp.arange(rows.shape[0]), jnp.where(owned, local, vocab)].set(
            column, mode="drop")
        return VocabSoftmax(shaped(exp, vocab), shaped(jnp.exp(offset - lse), 1), shaped(lse),
                            shaped(target))

    def specs(b, h):
        out = VocabSoftmax(*((P(b, None, h),) * 2 if exp_dtype is not None else (None, None)),
                           P(b, None), P(b, None))
        return (P(b, None, h), P(b, None)), out

    return _per_shard(run, logits.shape[0], (logits.shape[2],), specs)(logits, targets)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   precision: jax.lax.PrecisionLike = None, backend: str = "auto") -> jax.Array:
    """Expert matmul over rows sorted by expert (``jax.lax.ragged_dot`` semantics, fp32 result):
    ``ragged_dot`` on CPU/TPU, the Pallas grouped-matmul kernels on the GPU. Called per batch
    shard through :func:`routed_experts`."""
    return _named(grouped_matmul_api.grouped_matmul)(x, w, group_sizes, precision=precision,
                                                     backend=backend)


EXPERT_AXIS = "expert"


def routed_experts(run: Callable[..., jax.Array], x: jax.Array, experts: jax.Array,
                   weights: jax.Array, expert_params: tuple[jax.Array, ...]) -> jax.Array:
    """``run(x, experts, weights, expert_params, expert_axis)``: the routed-expert MLP of tokens
    ``x [B, T, H]`` with their chosen ``experts`` / combine ``weights [B, T, k]``, per batch shard
    under the mesh (each shard sorts and multiplies only its own tokens).

    With an ``expert`` mesh axis that splits both the batch and the experts (``expert_params``
    ``[E, ...]``), ``run`` gets this device's ``E / n`` experts and ``expert_axis="expert"``, and
    exchanges token copies with the devices that own their experts (expert parallelism);
    otherwise it gets every expert (gathered where stored sharded) and ``expert_axis=None``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    b = None if mesh.empty else _split_axes(BATCH_AXES, x.shape[0], mesh)
    devices = 1 if mesh.empty else mesh.shape.get(EXPERT_AXIS, 1)
    parallel = (b is not None and EXPERT_AXIS in b and devices > 1
                and expert_params[0].shape[0] % devices == 0)
    axis = EXPERT_AXIS if parallel else None

    def local(x, experts, weights, params):
        return run(x, experts, weights, params, axis)

    def specs(b, h):
        rows = P(b, None, None)
        expert = P(axis, *[None] * (expert_params[0].ndim - 1))
        return (rows, rows, rows, tuple(expert for _ in expert_params)), rows

    return _per_shard(local, x.shape[0], (), specs)(x, experts, weights, expert_params)
