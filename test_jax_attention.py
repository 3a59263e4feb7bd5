"""Tests of jax_attention.py: dropout masks and their tiles, dense attention.
$ python -m pytest -q test_jax_attention.py
"""
from functools import partial

import numpy as np
import jax
import jax.numpy as jnp

from jax_attention import dropout_mask, dropout_tile_mask, threefry_key, dense_attention


def qkv(shape):
    """Random q, k, v (B, T, nh, hs) and a cotangent for the output."""
    return [jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 4)]


def test_dropout_mask_is_unchanged():
    # the mask jax_transformer.dropout_mask draws: another mask for the same key would change the
    # resumed runs of old checkpoints
    keep = np.asarray(jax.jit(dropout_mask, static_argnums=(1, 2))(jax.random.key(0), (2, 3, 5, 9), 0.2))
    assert keep.sum() == 211
    assert np.packbits(keep.reshape(-1)).tolist() == [
        231, 47, 247, 252, 239, 191, 121, 253, 127, 235, 43, 238, 191, 252, 251, 251, 119,
        175, 247, 175, 175, 123, 190, 241, 248, 191, 251, 206, 95, 158, 255, 255, 127, 220]


def test_tile_masks_are_slices_of_the_whole_mask():
    key, shape, rate = jax.random.key(3), (2, 2, 9, 18), 0.2  # a last axis that is not a multiple of 4
    tiles = [(0, 9, 0, 18), (2, 7, 8, 16), (8, 9, 16, 18)]  # (i0, i1, j0, j1)
    rows = jnp.arange(4 * 9).reshape(4, 9)  # each row's flattened index in the leading axes

    @jax.jit
    def whole_and_tiles(key):
        key_words = threefry_key(key)
        return dropout_mask(key, shape, rate), [dropout_tile_mask(key_words, rows[:, i0:i1], j0, j1 - j0, rate)
                                                for i0, i1, j0, j1 in tiles]
    whole, got = whole_and_tiles(key)
    whole = np.asarray(whole).reshape(4, 9, 18)  # (B * nh, T, Tk)
    for (i0, i1, j0, j1), tile in zip(tiles, got):
        np.testing.assert_array_equal(tile, whole[:, i0:i1, j0:j1])


@partial(jax.jit, static_argnums=5)
def dense_and_grads(q, k, v, dy, key, rate):
    y, vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, 0, rate, key), q, k, v)
    return y, *vjp(dy)


def test_dense_with_a_query_offset_is_the_last_rows_of_the_whole():
    q, k, v, dy = qkv((2, 37, 3, 8))
    whole = dense_and_grads(q, k, v, dy, jax.random.key(7), 0.0)[0]
    last = jax.jit(dense_attention)(q[:, 30:], k, v, 30)
    np.testing.assert_allclose(last, whole[:, 30:], atol=1e-6)
