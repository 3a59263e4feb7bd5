"""
Causal self-attention for jax_transformer.py: its dropout masks. dropout_mask draws a whole mask,
dropout_tile_mask any tile of the same mask without making the whole, for attention computed a
tile at a time.
"""

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
