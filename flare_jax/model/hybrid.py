"""The hybrid LM: embeddings, decoder layers (Gated DeltaNet or gated attention, each + SwiGLU),
final norm and LM head, with the three call modes of the design: causal, flare and denoise."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flare_jax.config import FULL, ModelConfig
from flare_jax.layout import FlareLayout, document_positions
from flare_jax.model.attention import GatedAttention
from flare_jax.model.cache import DecodeCache, PendingAppend, write_rows
from flare_jax.model.gated_deltanet import GatedDeltaNet
from flare_jax.model.layer_scan import run_layers
from flare_jax.model.layers import Dense, Dtype, RMSNorm, SwiGLU, matmul_precision
from flare_jax.model.moe import RouterStats, SparseMoE
from pallas_kernels.block_attention.mask import TokenLayout


@dataclasses.dataclass(frozen=True)
class _CallPlan:
    """What the layers of one causal/denoise call read: attention keys (see
    :meth:`GatedAttention.__call__`) and, with a cache, which rows continue its last document."""

    q_layout: TokenLayout
    kv_layout: TokenLayout
    write_start: jax.Array | None = None
    continues: jax.Array | None = None


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: token mixer (linear or full attention), then the MLP (dense SwiGLU
    or, in the layers the config makes sparse, the mixture of experts).

    Its call modes also return the router statistics of the tokens where ``token_mask`` is True
    (:class:`~flare_jax.model.moe.RouterStats`): a sparse layer's, zeros from a dense layer of a
    model with experts, None in a dense model."""

    def __init__(self, config: ModelConfig, index: int, *, dtype: Dtype, param_dtype: Dtype,
                 rngs: nnx.Rngs, backend: str):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layer_type = config.layer_types[index]
        self.layer_type = layer_type
        norm_kw = dict(eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm_kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm_kw)
        if layer_type == FULL:
            self.self_attn = GatedAttention(config, backend=backend, **kw)
        else:
            self.linear_attn = GatedDeltaNet(config, backend=backend, **kw)
        self.mlp = (SparseMoE(config, backend=backend, **kw) if config.is_moe_layer(index) else
                    SwiGLU(config.hidden_size, config.intermediate_size, **kw))
        self.num_experts = config.num_experts  # width of the router statistics (0: dense model)

    def _mlp_block(self, h: jax.Array, token_mask: jax.Array | None
                   ) -> tuple[jax.Array, RouterStats | None]:
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, SparseMoE):
            out, stats = self.mlp(x, token_mask)
            return h + out, stats
        return h + self.mlp(x), RouterStats.zeros(self.num_experts) if self.num_experts else None

    def causal(self, h: jax.Array, segment_ids: jax.Array, plan: _CallPlan, cache, write: bool,
               token_mask: jax.Array | None = None):
        """Returns the new hidden states, the layer cache (updated when ``write``), the
        pending inputs of a linear layer's append (None otherwise) and the router statistics."""
        x = self.input_layernorm(h)
        pending = None
        if self.layer_type == FULL:
            mixed, new_cache = self.self_attn(x, plan.q_layout, plan.kv_layout, cache,
                                              plan.write_start)
        else:
            mixed, new_cache, pending = self.linear_attn(x, segment_ids, cache, plan.continues)
        h, stats = self._mlp_block(h + mixed, token_mask)
        return h, (new_cache if write else cache), pending, stats

    def flare(self, h: jax.Array, layout: FlareLayout, token_mask: jax.Array | None = None
              ) -> tuple[jax.Array, RouterStats | None]:
        """``h`` is ``[B, 2L, hidden]``: the clean stream followed by the noisy stream
        (``token_mask [B, 2L]`` likewise). Returns the new hidden states and router statistics."""
        x = self.input_layernorm(h)
        if self.layer_type == FULL:
            packed = layout.packed()
            mixed, _ = self.self_attn(x, packed, packed)
        else:
            mixed = self.linear_attn.flare(x, layout.clean.segment_ids, layout.block_size)
        return self._mlp_block(h + mixed, token_mask)


class HybridLM(nnx.Module):
    """Qwen3.5-style hybrid causal LM. Logits are fp32."""

    def __init__(self, config: ModelConfig, *, dtype: Dtype = jnp.bfloat16,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None,
                 backend: str = "auto"):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size),
                                     param_dtype))
        self.layers = nnx.List([
            DecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=backend)
            for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(config.hidden_size, config.vocab_size, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)

    def head_weight(self) -> tuple[jax.Array, bool]:
        """The LM head's weight (parameter dtype) and whether it is vocabulary-major: the tied
        embedding ``[V, hidden]`` (True) or the head kernel ``[hidden, V]`` (False)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens[...], True
        return self.lm_head.kernel[...], False

    def _final_hidden(self, h: jax.Array) -> jax.Array:
        return self.norm(h).astype(self.dtype)

    def _logits(self, h: jax.Array) -> jax.Array:
        weight, vocab_major = self.head_weight()
        head = weight.T if vocab_major else weight
        return jnp.einsum("...i,iv->...v", self._final_hidden(h), head.astype(self.dtype),
                          preferred_element_type=jnp.float32, precision=matmul_precision(self.dtype))

    def _run_causal(self, tokens: jax.Array, segment_ids: jax.Array, plan: _CallPlan,
                    cache: DecodeCache, write: bool) -> tuple[jax.Array, tuple, tuple]:
        h = self._embed(tokens)
        new_layers, pending = [], []
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            h, layer_cache, layer_pending, _ = layer.causal(h, segment_ids, plan, layer_cache,
                                                            write)
            new_layers.append(layer_cache)
            pending.append(layer_pending)
        return self._logits(h), tuple(new_layers), tuple(pending)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: DecodeCache | None = None, *,
                 scan_layers: bool = False, token_mask: jax.Array | None = None,
                 with_router_stats: bool = False, normed_hidden: bool = False,
                 remat: str = "none", constrain: Callable[[jax.Array], jax.Array] | None = None
                 ) -> tuple:
        """Causal mode. ``tokens [B, T]``; documents marked by ``segment_ids`` (default: one per
        row); ``positions`` default to positions inside each document, and are required with a cache.
        Without a cache, ``scan_layers`` runs repeated layer groups in one ``lax.scan`` (see
        :func:`~flare_jax.model.layer_scan.run_layers`; same numbers, faster compile), and
        ``remat`` / ``constrain`` act as in :meth:`flare` (training).
        Returns ``(logits, cache or None)``; with ``with_router_stats`` (no cache) also the MoE
        router statistics summed over the layers, counting the tokens where ``token_mask [B, T]``
        is True (all by default; None for a dense model):
        :func:`~flare_jax.model.moe.load_balancing_loss` of them is HF's auxiliary loss.
        ``normed_hidden`` (no cache) returns the final-normed hidden states ``[B, T, hidden]``
        (compute dtype) in place of the logits, for a loss that applies :meth:`head_weight`
        itself (the chunked cross-entropy of training).

        With a cache the tokens follow it (written at each row's ``length``) and the updated cache
        is returned. A row whose first new token has the segment id of the cache's last token
        continues that document; otherwise it starts a new one (linear layers start from zero state).
        """
        segment_ids = jnp.ones_like(tokens, jnp.int32) if segment_ids is None else segment_ids
        if cache is not None:
            if positions is None:
                raise ValueError("positions are required when decoding with a cache")
            if with_router_stats:
                raise ValueError("router statistics are only returned without a cache")
            logits, cache, _ = self.append(tokens, segment_ids, positions, cache)
            return logits, cache
        positions = document_positions(segment_ids) if positions is None else positions
        q_layout = TokenLayout.causal(segment_ids, positions)
        plan = _CallPlan(q_layout, q_layout)
        collect = with_router_stats and self.config.num_experts > 0

        keep = constrain if constrain is not None else (lambda x: x)

        def apply(layer: DecoderLayer, h: jax.Array) -> tuple[jax.Array, RouterStats | None]:
            h, _, _, stats = layer.causal(h, segment_ids, plan, None, False, token_mask)
            return keep(h), stats if collect else None

        h, stats = run_layers(self.layers, keep(self._embed(tokens)), apply, scan=scan_layers,
                              remat=remat,
                              aux=RouterStats.zeros(self.config.num_experts) if collect else None)
        logits = self._final_hidden(h) if normed_hidden else self._logits(h)
        return (logits, None, stats) if with_router_stats else (logits, None)

    def append(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
               cache: DecodeCache) -> tuple[jax.Array, DecodeCache, PendingAppend]:
        """Causal pass over ``tokens [B, T]`` appended to the cache. Returns the logits, the cache
        after all of them, and what :meth:`keep_prefix` needs to keep fewer of them."""
        q_layout = TokenLayout.causal(segment_ids, positions)
        start = cache.length
        written = DecodeCache(cache.layers, write_rows(cache.segment_ids, segment_ids, start),
                              write_rows(cache.positions, positions, start),
                              start + tokens.shape[1])
        plan = _CallPlan(q_layout, written.layout(), start, cache.continues(segment_ids))
        logits, layers, pending = self._run_causal(tokens, segment_ids, plan, cache, write=True)
        return (logits, dataclasses.replace(written, layers=layers),
                PendingAppend(start, segment_ids, pending))

    def keep_prefix(self, cache: DecodeCache, pending: PendingAppend, keep: jax.Array
                    ) -> DecodeCache:
        """Cut the last :meth:`append` back to its first ``keep [B]`` tokens per row (the appended
        tokens must continue one document). Attention slots past the prefix are emptied; linear
        layers rerun only their recurrence from the state before the append."""
        layers = tuple(
            layer_cache if layer_pending is None else
            self.layers[i].linear_attn.cache_after_prefix(layer_pending, pending.segment_ids, keep)
            for i, (layer_cache, layer_pending) in enumerate(zip(cache.layers, pending.layers,
                                                                 strict=True)))
        return dataclasses.replace(cache, layers=layers).keep_slots(pending.start + keep)

    def append_then_denoise(self, tokens: jax.Array, segment_ids: jax.Array,
                            positions: jax.Array, noisy: jax.Array, noisy_positions: jax.Array,
                            cache: DecodeCache) -> tuple[jax.Array, jax.Array, DecodeCache]:
        """One pass over a clean block ``tokens [B, T]`` appended to the cache (as :meth:`append`)
        and the noisy block ``noisy [B, bs]`` that follows it (as :meth:`denoise` would see it
        after that append): the FLARE ``[clean ; noisy]`` layout at decode time.

        The noisy block continues the last clean token's document, sees every cached and clean
        token of it and all of its own tokens; linear layers run causally over both parts. Returns
        the clean logits, the noisy logits and the cache ending exactly after the clean tokens.
        """
        length = tokens.shape[1]
        noisy_segments = jnp.broadcast_to(segment_ids[:, -1:], noisy.shape)
        ones = jnp.ones_like(noisy_segments)
        q_layout = TokenLayout.causal(segment_ids, positions).concat(
            TokenLayout(noisy_segments, noisy_positions, ones, ones))
        start = cache.length
        written = DecodeCache(cache.layers,
                              write_rows(cache.segment_ids, q_layout.segment_ids, start),
                              write_rows(cache.positions, q_layout.positions, start),
                              start + q_layout.shape[1])
        empty = jnp.zeros_like(written.segment_ids)
        kv_layout = TokenLayout(written.segment_ids, written.positions,
                                write_rows(empty, q_layout.block_ids, start),
                                write_rows(empty, q_layout.noisy, start))
        plan = _CallPlan(q_layout, kv_layout, start, cache.continues(segment_ids))
        logits, layers, pending = self._run_causal(jnp.concatenate([tokens, noisy], axis=1),
                                                   q_layout.segment_ids, plan, cache, write=True)
        full = dataclasses.replace(written, layers=layers)
        cache = self.keep_prefix(full, PendingAppend(start, q_layout.segment_ids, pending),
                                 jnp.full_like(start, length))
        return logits[:, :length], logits[:, length:], cache

    def denoise(self, tokens: jax.Array, cache: DecodeCache, positions: jax.Array,
                segment_ids: jax.Array | None = None) -> jax.Array:
        """Logits of one noisy block ``[B, bs]`` that follows the cache; the cache is only read.

        The block sees every cached token of its document and all of its own tokens (attention
        layers), and continues the cached conv window and recurrent state causally (linear layers),
        exactly as noisy blocks do in FLARE training.
        """
        segment_ids = jnp.ones_like(tokens, jnp.int32) if segment_ids is None else segment_ids
        ones = jnp.ones_like(segment_ids)
        q_layout = TokenLayout(segment_ids, positions, ones, ones)
        plan = _CallPlan(q_layout, cache.layout().concat(q_layout), None,
                         cache.continues(segment_ids))
        logits, _, _ = self._run_causal(tokens, segment_ids, plan, cache, write=False)
        return logits

    def flare(self, clean: jax.Array, noisy: jax.Array, layout: FlareLayout, *,
              remat: str = "none", constrain: Callable[[jax.Array], jax.Array] | None = None,
              scan_layers: bool = False, token_mask: jax.Array | None = None,
              with_router_stats: bool = False, normed_hidden: bool = False) -> tuple:
        """FLARE training mode: the clean row and its noised copy ``[B, L]`` in one pass.

        ``remat`` (one of ``layer_scan.REMAT_POLICIES``, see
        :mod:`~flare_jax.model.layer_scan`) says what each decoder layer keeps for the backward
        pass; ``constrain`` is applied to the hidden states ``[B, 2L, hidden]`` after the
        embedding and every layer (training uses it for sharding constraints); ``scan_layers`` runs
        repeated layer groups in one ``lax.scan`` (see :func:`~flare_jax.model.layer_scan.run_layers`;
        same numbers, the program holds one group instead of every layer).
        Returns ``(clean_logits, noisy_logits)``, each ``[B, L, V]``; with ``with_router_stats``
        also the MoE router statistics summed over the layers and BOTH streams, counting the
        positions where ``token_mask [B, L]`` is True in the clean and in the noisy stream (all by
        default; None for a dense model), see :meth:`__call__`. ``normed_hidden`` returns the
        final-normed hidden states ``[B, L, hidden]`` of each stream instead of the logits.
        """
        keep = constrain if constrain is not None else (lambda x: x)
        both = None if token_mask is None else jnp.concatenate([token_mask, token_mask], axis=1)
        collect = with_router_stats and self.config.num_experts > 0

        def apply(layer: DecoderLayer, h: jax.Array) -> tuple[jax.Array, RouterStats | None]:
            h, stats = layer.flare(h, layout, both)
            return keep(h), stats if collect else None

        h = keep(self._embed(jnp.concatenate([clean, noisy], axis=1)))
        h, stats = run_layers(self.layers, h, apply, scan=scan_layers, remat=remat,
                              aux=RouterStats.zeros(self.config.num_experts) if collect else None)
        out = self._final_hidden(h) if normed_hidden else self._logits(h)
        clean_logits, noisy_logits = jnp.split(out, 2, axis=1)
        return ((clean_logits, noisy_logits, stats) if with_router_stats
                else (clean_logits, noisy_logits))
