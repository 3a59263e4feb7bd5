"""
Causal self-attention for jax_transformer.py. q (B, T, nh, hs), k and v (B, Tk, nh, hs) in, as the
model makes them; (B, T, nh, hs) out, in v's dtype.
- dense_attention: all (B, nh, T, Tk) scores at once, kept for the backward pass, the queries at
  any offset (the key/value cache);
- dropout_mask and dropout_tile_mask: its dropout masks, whole or a tile at a time.
"""

import math

import numpy as np
import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p


def threefry_key(key):
    """The two uint32 words of the threefry key that dropout masks draw from, whatever kind key is."""
    return jax.random.bits(key, (2,), jnp.uint32)


def keep_from_counters(key_words, row, word, rate):
    """Dropout's keep mask (..., 4 * words) from the threefry draws at counters (row, word), both
    (..., words): draw (row, w) gives the four 16-bit uniforms of columns 4w..4w+3."""
    hi, lo = threefry2x32_p.bind(key_words[0], key_words[1], row, word)
    halves = jnp.stack([hi >> 16, hi & 0xFFFF, lo >> 16, lo & 0xFFFF], axis=-1)  # (..., words, 4)
    uniforms = halves.reshape(*row.shape[:-1], -1)  # 16-bit uniforms
    return uniforms >= np.uint32(round(rate * 2 ** 16))


def dropout_mask(key, shape, rate):
    """A boolean mask of shape, False (drop) with probability rate rounded to a multiple of 2^-16
    (0.2 drops 13107/65536 = 0.199997), from any jax key. Each threefry draw (64 bits) gives four
    16-bit uniforms, where flax's nn.Dropout spends a whole draw and a float conversion on every
    element: random bits for the (B, nh, T, T) attention and every residual stream were a large
    part of a GPU step with dropout. The counters are positions in the mask, so that a sharded
    mask is the same as a whole one, and so is a tile of it (dropout_tile_mask)."""
    *lead, n = shape
    words_shape = (*lead, -(-n // 4))  # one draw per 4 elements of the last axis
    # the draw's counter: (row of the leading axes, word in the row)
    strides = np.cumprod([1] + lead[::-1])[::-1][1:]
    row = sum((jax.lax.broadcasted_iota(jnp.uint32, words_shape, d) * np.uint32(stride)
               for d, stride in enumerate(strides)), jnp.zeros(words_shape, jnp.uint32))
    col = jax.lax.broadcasted_iota(jnp.uint32, words_shape, len(lead))
    return keep_from_counters(threefry_key(key), row, col, rate)[..., :n]


def dropout_tile_mask(key_words, rows, j0, width, rate):
    """Columns j0..j0+width of the given rows of dropout_mask(key, shape, rate), without making the
    whole mask: key_words = threefry_key(key), rows (...,) are flattened indices of the mask's
    leading axes, and j0 is a multiple of 4, so that the tile starts on a whole draw."""
    words = -(-width // 4)
    row = jnp.broadcast_to(rows.astype(jnp.uint32)[..., None], (*rows.shape, words))
    word = (j0 // 4 + jax.lax.broadcasted_iota(jnp.int32, row.shape, row.ndim - 1)).astype(jnp.uint32)
    return keep_from_counters(key_words, row, word, rate)[..., :width]


def dropped(x, keep, rate):
    """Dropout with a given keep mask: zeros where dropped, the rest scaled by 1 / (1 - rate)."""
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def dense_attention(q, k, v, q_offset=0, dropout_rate=0.0, dropout_key=None):
    """Attention with the (B, nh, T, Tk) scores written out, the queries at positions
    q_offset + arange(T) of the Tk keys. Dropout, when dropout_key is given and the rate is not 0,
    drops probabilities where dropout_mask(dropout_key, (B, nh, T, Tk), dropout_rate) is False."""
    T, Tk, hs = q.shape[1], k.shape[1], q.shape[-1]
    q_pos = q_offset + jnp.arange(T)
    mask = jnp.arange(Tk)[None, :] <= q_pos[:, None]  # (T, Tk) causal
    # attention in float32: (B, nh, T, Tk)
    att = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(hs)
    att = jnp.where(mask, att, jnp.finfo(jnp.float32).min)
    att = jax.nn.softmax(att, axis=-1).astype(v.dtype)
    if dropout_key is not None and dropout_rate > 0.0:
        att = dropped(att, dropout_mask(dropout_key, att.shape, dropout_rate), dropout_rate)
    return jnp.einsum('bhqk,bkhd->bqhd', att, v)
