"""Text conditioning in training and sampling: prompt dropout and classifier-free guidance.

Prompt dropout (`text.dropout`): a training example's context is the empty prompt's with that
probability, so the model also learns the unconditional prediction that classifier-free guidance
needs: eps = eps(c, neg) + w (eps(c, prompt) - eps(c, neg)) (Ho & Salimans 2022), with `neg` the
negative prompt's embedding ('' by default) and w = `text.guidance_scale` (1: off, one pass). The
embeddings come from `codi_jax/pretrained/text_encoder.py`: its prompt table, or its encoder run in
the step on each record's tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from codi_jax.methods import base

PROMPT_SOURCES = ("auto", "table", "encoder")


def validate(t) -> None:
    """One line naming the first bad field of the `text` config section (tasks with prompts)."""
    if not 0.0 <= t.dropout < 1.0:
        raise ValueError(f"config text.dropout={t.dropout} must be in [0, 1)")
    if t.guidance_scale < 0:
        raise ValueError(f"config text.guidance_scale={t.guidance_scale} must be >= 0")
    if t.prompt_source not in PROMPT_SOURCES:
        raise ValueError(f"config text.prompt_source={t.prompt_source!r} is not one of {PROMPT_SOURCES}")


def lookup(table, prompt_index):
    """Contexts [B, L, D] of prompt indices [B] (row 0 of the table is the empty prompt)."""
    return jnp.take(table, prompt_index + 1, axis=0)


def with_prompts(loss_fn, dropout: float, table=None, encode=None, empty_tokens=None, empty_context=None):
    """Wrap a loss: batch['context'] = the embeddings of the batch's prompts, each replaced by the empty
    prompt's with probability `dropout` (for classifier-free guidance).

    batch['prompt'] [B] int: rows of the prompt table, frozen['prompt_table'] (or `table`, a constant of
    the step: the tiny teacher's, so its checkpoints hold no prompts and one teacher serves every task).
    batch['prompt'] [B, L] int: token ids, encoded in the step by encode(frozen['text_encoder'], ids)
    (or encode(None, ids) when `encode` holds its params as constants); a dropped prompt's ids become
    `empty_tokens` [L]. The encoder is frozen: no gradient flows into it.
    batch['context'] [B, L, D]: the records' cached encoder outputs (docs/data.md); a dropped prompt's
    becomes `empty_context` [1, L, D], the empty prompt's embedding."""

    def wrapped(params, frozen, ema_params, batch, rng):
        idx = batch["prompt"]
        keys = base.example_keys(rng, idx.shape[0])
        k_drop, k_loss = base.split_each(keys)
        drop = jax.vmap(lambda k: jax.random.uniform(k) < dropout)(k_drop)
        if "context" in batch:
            cached = batch["context"]
            ctx = jnp.where(drop[:, None, None], jnp.asarray(empty_context, cached.dtype), cached)
        elif idx.ndim == 2:
            ids = jnp.where(drop[:, None], jnp.asarray(empty_tokens)[None], idx)
            ctx = jax.lax.stop_gradient(encode(frozen.get("text_encoder"), ids))
        else:
            rows = frozen["prompt_table"] if table is None else jnp.asarray(table)
            ctx = jnp.take(rows, jnp.where(drop, 0, idx + 1), axis=0)
        return loss_fn(params, frozen, ema_params, dict(batch, context=ctx), k_loss)

    return wrapped


@dataclasses.dataclass(frozen=True)
class Guided:
    """Classifier-free guidance around a denoiser: context is {'prompt': [B, L, D], 'negative': [B or 1, L, D]}.
    Both passes run as one batch of 2B; (x_hat, eps_hat) = neg + scale (prompt - neg)."""

    denoiser: base.Denoiser
    scale: float

    @property
    def schedule(self):
        return self.denoiser.schedule

    def __call__(self, params, z, t, cond=None, context=None):
        pos = context["prompt"]
        neg = jnp.broadcast_to(context["negative"], pos.shape)  # one negative prompt ([1, L, D]) for all
        if self.scale == 1.0:
            return self.denoiser(params, z, t, cond, pos)
        two = lambda a: None if a is None else jnp.concatenate([a, a])
        t = jnp.broadcast_to(jnp.asarray(t), (z.shape[0],))
        x2, e2 = self.denoiser(params, two(z), two(t), two(cond), jnp.concatenate([pos, neg]))
        n = z.shape[0]
        mix = lambda a: a[n:] + self.scale * (a[:n] - a[n:])
        return mix(x2), mix(e2)
