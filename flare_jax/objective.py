"""FLARE objective: noising of the noisy stream, AR and diffusion cross-entropies, their balance.

Noise: each block (or each packed row) draws ``t ~ U(eps, 1)``; every maskable token of the noisy
copy is replaced by ``mask_token_id`` with probability ``t`` (or a position-dependent rate of mean
``t``).

Loss, over supervised tokens only (log-softmax and sums in fp32):
  - AR: clean logits at ``i`` predict ``tokens[i + 1]`` when both are in the same document and the
    target is a loss token;
  - diffusion: noisy logits predict each masked token; position ``i`` predicts token ``i``, or
    with ``logit_shift`` position ``i - 1`` of the same document does (a masked document start
    then has no predictor and is not supervised); optionally weighted by ``1 / t`` (ELBO weight);
  - total ``(w_ar * sum_ar + w_diff * sum_diff) / (w_ar * n_ar + w_diff * n_diff)``: every
    supervised token of either kind weighs the same; a weight of 0 ablates a term.

The cross-entropies come from full logits, or (training) from the final hidden states through the
LM head (:func:`head_cross_entropy`) over vocabulary chunks or over chunks of positions, without
the ``[B, L, V]`` logits. Each token's weight in the total is known before the cross-entropy is
taken, so a :data:`CrossEntropy` returns the weighted sum itself (the position-chunked head forms
its gradients in the forward pass from those weights).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from flare_jax.layout import FlareLayout
from flare_jax.token_ce import weighted_cross_entropy
from flare_jax.vocab_ce import chunked_cross_entropy

# (predictor [B, L, ...], targets [B, L], loss weight of each token [B, L])
Scored = tuple[jax.Array, jax.Array, jax.Array]
# scored triples -> (sum of weight x cross-entropy over all of them, differentiable; the per-token
# cross-entropies [B, L] in fp32, one per triple, for metrics)
CrossEntropy = Callable[[Sequence[Scored]], tuple[jax.Array, list[jax.Array]]]

_NOISE_PER = ("block", "sequence")


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """How the noisy stream is corrupted.

    Attributes:
      mask_token_id: id written over masked tokens.
      eps: lower end of ``t ~ U(eps, 1)``, in ``[0, 1)``.
      per: ``"block"`` draws one ``t`` per block of the row's grid, ``"sequence"`` one per
        packed row.
      position_dependent: if set, the token at offset ``j`` of a block of size ``S`` is masked with
        rate ``t + min(t, 1 - t) * (2 (j + 0.5) / S - 1)``: a linear ramp rising toward the block's
        end, inside ``[0, 1]``, whose mean over a full block is exactly ``t`` (steepest such ramp).
    """

    mask_token_id: int
    eps: float = 1e-3
    per: str = "block"
    position_dependent: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            raise ValueError(
                f"mask_token_id must be a non-negative int, got {self.mask_token_id!r}"
            )
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must lie in [0, 1), got {self.eps!r}")
        if self.per not in _NOISE_PER:
            raise ValueError(f"per must be one of {_NOISE_PER}, got {self.per!r}")
        if not isinstance(self.position_dependent, bool):
            raise ValueError(
                f"position_dependent must be a bool, got {self.position_dependent!r}"
            )


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Balance of the FLARE loss terms.

    Attributes:
      ar_weight: weight of each AR token (0 gives diffusion-only training).
      diffusion_weight: weight of each diffusion token (0 gives AR-only training).
      logit_shift: noisy position ``i - 1`` predicts masked token ``i`` (as AR heads were
        trained).
      elbo_weighting: weight each diffusion token's cross-entropy by ``1 / t``, ``t`` being that
        token's masking rate (needs ``eps > 0`` in the noise config so that ``t`` is never 0).
      router_aux_weight: weight of a mixture-of-experts model's router load-balancing loss, which
        the train step adds to this loss (HF's ``router_aux_loss_coef``; no effect on dense
        models).
    """

    ar_weight: float = 1.0
    diffusion_weight: float = 1.0
    logit_shift: bool = False
    elbo_weighting: bool = False
    router_aux_weight: float = 0.001

    def __post_init__(self) -> None:
        for name in ("ar_weight", "diffusion_weight", "router_aux_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if self.ar_weight == 0 and self.diffusion_weight == 0:
            raise ValueError("ar_weight and diffusion_weight are both 0: nothing would be trained")
        for name in ("logit_shift", "elbo_weighting"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def noise_rates(rng: jax.Array, layout: FlareLayout, cfg: NoiseConfig) -> jax.Array:
    """Masking probability of every token, fp32 ``[B, L]``; ``t`` per block or per row."""
    batch, length = layout.clean.shape
    draws = layout.num_blocks if cfg.per == "block" else 1
    t = jax.random.uniform(rng, (batch, draws), jnp.float32, minval=cfg.eps, maxval=1.0)
    if cfg.per == "block":
        rate = jnp.take_along_axis(t, layout.clean.block_ids, axis=1)
    else:
        rate = jnp.broadcast_to(t, (batch, length))
    if cfg.position_dependent:
        offset = jnp.arange(length, dtype=jnp.float32) % layout.block_size
        ramp = 2.0 * (offset + 0.5) / layout.block_size - 1.0
        rate = rate + jnp.minimum(rate, 1.0 - rate) * ramp
    return rate


def add_noise(
    rng: jax.Array,
    tokens: jax.Array,
    layout: FlareLayout,
    maskable: jax.Array,
    cfg: NoiseConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Corrupt the noisy copy of ``tokens [B, L]``.

    ``maskable`` (bool ``[B, L]``) marks loss tokens: prompt tokens and padding are never masked.
    Returns ``(noisy_tokens, noise_mask, t_per_token)``: the corrupted tokens, where the mask token
    was written, and each token's masking rate (fp32).
    """
    _check_shapes(tokens=tokens, maskable=maskable, segment_ids=layout.clean.segment_ids)
    rate_rng, mask_rng = jax.random.split(rng)
    rate = noise_rates(rate_rng, layout, cfg)
    draw = jax.random.uniform(mask_rng, tokens.shape, jnp.float32)
    noise_mask = (draw < rate) & maskable.astype(bool)
    noisy_tokens = jnp.where(noise_mask, jnp.asarray(cfg.mask_token_id, tokens.dtype), tokens)
    return noisy_tokens, noise_mask, rate


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token ``-log softmax(logits)[target]`` in fp32; logits ``[B, L, V]``, targets
    ``[B, L]``."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit[..., 0]


def per_token(cross_entropy: Callable[[jax.Array, jax.Array], jax.Array]) -> CrossEntropy:
    """A :data:`CrossEntropy` from a per-token one, ``(predictor, targets) -> [B, L]``."""
    def weighted(scored: Sequence[Scored]) -> tuple[jax.Array, list[jax.Array]]:
        ces = [cross_entropy(x, targets) for x, targets, _ in scored]
        total = sum(jnp.sum(w * ce) for (_, _, w), ce in zip(scored, ces, strict=True))
        return total, ces

    return weighted


def head_cross_entropy(weight: jax.Array, vocab_major: bool, *, vocab_chunk: int = 0,
                       token_chunk: int = 0, logits_dtype: str = "float32",
                       backend: str = "auto") -> CrossEntropy:
    """Cross-entropy of final-normed hidden states ``[B, L, hidden]`` through the LM head
    ``weight`` (see :meth:`~flare_jax.model.hybrid.HybridLM.head_weight`), without the logits:

    - ``token_chunk > 0``: over steps of about that many tokens with the whole vocabulary, all
      triples in one pass (rows side by side), gradients formed in the forward pass
      (:func:`~flare_jax.token_ce.weighted_cross_entropy`, the logits stored in
      ``logits_dtype``, their logsumexp by the ``backend``'s kernel);
    - else over vocabulary chunks of ``vocab_chunk`` ids, each triple on its own
      (:func:`~flare_jax.vocab_ce.chunked_cross_entropy`).
    """
    if token_chunk > 0:
        def by_positions(scored: Sequence[Scored]) -> tuple[jax.Array, list[jax.Array]]:
            hidden, targets, weights = (jnp.concatenate(parts, axis=1)
                                        for parts in zip(*scored, strict=True))
            total, ce = weighted_cross_entropy(hidden, weight, targets, weights,
                                               vocab_major=vocab_major, chunk_tokens=token_chunk,
                                               logits_dtype=jnp.dtype(logits_dtype),
                                               backend=backend)
            ends = list(itertools.accumulate(t.shape[1] for _, t, _ in scored))
            return total, jnp.split(ce, ends[:-1], axis=1)

        return by_positions
    if vocab_chunk < 1:
        raise ValueError(f"head_cross_entropy needs vocab_chunk or token_chunk > 0, got "
                         f"{vocab_chunk}, {token_chunk}")
    if logits_dtype != "float32":
        raise ValueError(f"logits_dtype {logits_dtype!r} needs token_chunk > 0: the vocabulary "
                         "chunks keep fp32 logits")

    def by_vocabulary(hidden: jax.Array, targets: jax.Array) -> jax.Array:
        return chunked_cross_entropy(hidden, weight, targets, vocab_major=vocab_major,
                                     chunk_size=vocab_chunk)

    return per_token(by_vocabulary)


def flare_loss(
    clean: jax.Array,
    noisy: jax.Array,
    tokens: jax.Array,
    noise_mask: jax.Array,
    loss_mask: jax.Array,
    segment_ids: jax.Array,
    t_per_token: jax.Array,
    cfg: LossConfig,
    cross_entropy: CrossEntropy | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-balanced FLARE loss and its metrics.

    ``clean`` / ``noisy`` are what ``cross_entropy`` scores against the target tokens (one call,
    both streams): logits ``[B, L, V]`` (any float dtype) by default (``None``:
    ``per_token(token_cross_entropy)``), or final-normed hidden states ``[B, L, hidden]`` with
    :func:`head_cross_entropy`; the rest is ``[B, L]``. Metrics: ``loss``,
    ``ar_loss`` / ``diffusion_loss`` (mean cross-entropy per supervised token, unweighted),
    ``ar_tokens`` / ``diffusion_tokens`` (counts), and with ``elbo_weighting`` also
    ``diffusion_elbo_loss`` (mean of the ``1 / t``-weighted cross-entropy).
    """
    _check_shapes(
        tokens=tokens, noise_mask=noise_mask, loss_mask=loss_mask, segment_ids=segment_ids,
        t_per_token=t_per_token, clean=clean[..., 0], noisy=noisy[..., 0],
    )
    loss_mask = loss_mask.astype(bool)
    same_doc_next = segment_ids[:, :-1] == segment_ids[:, 1:]

    ar_valid = same_doc_next & loss_mask[:, 1:]
    masked = noise_mask.astype(bool) & loss_mask
    if cfg.logit_shift:
        diff_valid = same_doc_next & masked[:, 1:]
        diff_scored, t = (noisy[:, :-1], tokens[:, 1:]), t_per_token[:, 1:]
    else:
        diff_valid = masked
        diff_scored, t = (noisy, tokens), t_per_token
    elbo = 1.0 / t.astype(jnp.float32) if cfg.elbo_weighting else 1.0

    n_ar = jnp.sum(ar_valid, dtype=jnp.float32)
    n_diff = jnp.sum(diff_valid, dtype=jnp.float32)
    denominator = cfg.ar_weight * n_ar + cfg.diffusion_weight * n_diff
    per_weight = 1.0 / jnp.where(denominator > 0, denominator, 1.0)
    ar_weights = jnp.where(ar_valid, cfg.ar_weight * per_weight, 0.0)
    diff_weights = jnp.where(diff_valid, cfg.diffusion_weight * per_weight * elbo, 0.0)
    cross_entropy = cross_entropy or per_token(token_cross_entropy)
    total, (ar_ce, diff_ce) = cross_entropy(
        [(clean[:, :-1], tokens[:, 1:], ar_weights), (*diff_scored, diff_weights)])

    sum_ar = jnp.sum(jnp.where(ar_valid, ar_ce, 0.0))
    sum_diff = jnp.sum(jnp.where(diff_valid, diff_ce, 0.0))
    metrics = {
        "loss": total,
        "ar_loss": sum_ar / jnp.maximum(n_ar, 1.0),
        "ar_tokens": n_ar,
        "diffusion_loss": sum_diff / jnp.maximum(n_diff, 1.0),
        "diffusion_tokens": n_diff,
    }
    if cfg.elbo_weighting:
        sum_diff_weighted = jnp.sum(jnp.where(diff_valid, diff_ce * elbo, 0.0))
        metrics["diffusion_elbo_loss"] = sum_diff_weighted / jnp.maximum(n_diff, 1.0)
    return total, metrics


def _check_shapes(**arrays: jax.Array) -> None:
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected matching [B, L] shapes (logits [B, L, V]), got {shapes}")
