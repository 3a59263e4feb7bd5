"""Tests of jax_attention.py: dropout masks and their tiles, blockwise against dense attention (values,
gradients, memory), both against PyTorch, and the choice attention() makes.
$ python -m pytest -q test_jax_attention.py
"""
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jax_attention
from conftest import cpu_devices
from jax_attention import (dropout_mask, dropout_tile_mask, threefry_key, dense_attention, blockwise_attention,
                           attention)


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


@partial(jax.jit, static_argnums=(5, 6, 7, 8))
def blockwise_and_grads(q, k, v, dy, key, rate, block_q, block_k, tile_size):
    y, vjp = jax.vjp(lambda q, k, v: blockwise_attention(q, k, v, rate, key, block_q, block_k, tile_size), q, k, v)
    return y, *vjp(dy)


@partial(jax.jit, static_argnums=5)
def dense_and_grads(q, k, v, dy, key, rate):
    y, vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, 0, rate, key), q, k, v)
    return y, *vjp(dy)


@pytest.mark.parametrize('T, block_q, block_k, tile_size, rate', [
    (37, 16, 128, 2 ** 16, 0.0),  # T a multiple of neither block, key blocks cut to T rounded up to 4
    (36, 8, 16, 8 * 16 * 2, 0.2),  # keys padded beyond the queries, heads in groups of 2
    (64, 16, 16, 2 ** 16, 0.0),  # T a multiple of both
    (64, 16, 16, 2 ** 16, 0.2),
])
def test_blockwise_equals_dense_values_and_gradients(T, block_q, block_k, tile_size, rate):
    q, k, v, dy = qkv((2, T, 3, 8))
    key = jax.random.key(7)  # the same key, the same dropout mask in both
    got = blockwise_and_grads(q, k, v, dy, key, rate, block_q, block_k, tile_size)
    want = dense_and_grads(q, k, v, dy, key, rate)
    for g, w, name in zip(got, want, ('y', 'dq', 'dk', 'dv')):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=name)
    if rate:  # dropout did happen
        assert not np.allclose(got[0], dense_and_grads(q, k, v, dy, key, 0.0)[0], atol=1e-3)


def test_blockwise_in_bfloat16_accumulates_in_float32():
    q, k, v, dy = qkv((2, 37, 3, 8))  # the first case above, whose dense results are compiled already
    want = dense_and_grads(q, k, v, dy, jax.random.key(7), 0.0)
    got = blockwise_and_grads(*(x.astype(jnp.bfloat16) for x in (q, k, v, dy)), None, 0.0, 128, 128, 2 ** 16)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), w, atol=0.05, rtol=0.02)


def test_dense_with_a_query_offset_is_the_last_rows_of_the_whole():
    q, k, v, dy = qkv((2, 37, 3, 8))
    whole = dense_and_grads(q, k, v, dy, jax.random.key(7), 0.0)[0]
    last = jax.jit(dense_attention)(q[:, 30:], k, v, 30)
    np.testing.assert_allclose(last, whole[:, 30:], atol=1e-6)


def temp_bytes(attn, shape):
    """Scratch memory of the compiled forward and backward pass of attn."""
    q, k, v, dy = qkv(shape)
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * dy), argnums=(0, 1, 2)))
    return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_in_T():
    # at the same B * T, dense attention's (B, nh, T, T) grow 4x; blockwise's tiles keep their size,
    # only the buffers of one group of heads (H, T, hs) grow (1.46x here)
    short, long = (8, 256, 4, 32), (2, 1024, 4, 32)
    blockwise = temp_bytes(blockwise_attention, long) / temp_bytes(blockwise_attention, short)
    dense = temp_bytes(dense_attention, long) / temp_bytes(dense_attention, short)
    assert dense > 3 and blockwise < 2, (dense, blockwise)


def test_blockwise_keeps_a_sharded_batch_sharded():
    # as dense attention does, each device works on its own rows (jit on a batch sharded over devices)
    code = """if True:
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jax_attention import blockwise_attention
        q = jax.device_put(jnp.ones((8, 256, 4, 32)), NamedSharding(Mesh(np.array(jax.devices()), 'data'), P('data')))
        compiled = jax.jit(lambda q: blockwise_attention(q, q, q)).lower(q).compile()
        assert 'all-gather' not in compiled.as_text() and compiled.output_shardings.spec == P('data')
    """
    env = dict(os.environ, XLA_FLAGS=cpu_devices(2), JAX_PLATFORMS='cpu')
    subprocess.run([sys.executable, '-c', code], env=env, cwd=os.path.dirname(os.path.abspath(__file__)), check=True)


def test_blockwise_and_dense_match_pytorch():
    torch = pytest.importorskip('torch')
    q, k, v, dy = qkv((2, 37, 3, 8))  # the first case above: compiled already
    to_torch = lambda x: torch.tensor(np.asarray(x)).transpose(1, 2)  # (B, nh, T, hs)
    want = torch.nn.functional.scaled_dot_product_attention(*map(to_torch, (q, k, v)), is_causal=True)
    want = want.transpose(1, 2).numpy()
    y = blockwise_and_grads(q, k, v, dy, jax.random.key(7), 0.0, 16, 128, 2 ** 16)[0]
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(dense_and_grads(q, k, v, dy, jax.random.key(7), 0.0)[0], want, atol=1e-5, rtol=0)


@pytest.fixture
def chosen(monkeypatch):
    """attention()'s choice among stand-ins for the four implementations."""
    choices = []
    monkeypatch.setattr(jax_attention, 'dense_attention', lambda q, *args: choices.append('dense') or q)
    monkeypatch.setattr(jax_attention, 'blockwise_attention', lambda q, *args: choices.append('blockwise') or q)
    monkeypatch.setattr(jax_attention, 'flash_attention', lambda q, *args: choices.append('flash') or q)
    monkeypatch.setattr(jax.nn, 'dot_product_attention', lambda q, *args, **kw: choices.append('cudnn') or q)
    return choices


@pytest.mark.parametrize('B, T, rate, want', [
    (12, 64, 0.0, 'dense'),  # the CPU config: 12 * 4 * 64 * 64 scores, in cache
    (128, 64, 0.0, 'dense'),  # T up to 64 runs dense, however many scores
    (128, 64, 0.2, 'dense'),
    (512, 32, 0.0, 'dense'),
    (32, 128, 0.0, 'blockwise'),
    (32, 128, 0.2, 'blockwise'),
    (2, 256, 0.2, 'dense'),  # 2^19 scores
    (3, 256, 0.2, 'blockwise'),
])
def test_auto_on_cpu_follows_the_rule(chosen, B, T, rate, want):
    q = jnp.zeros((B, T, 4, 1))  # the rule looks at shapes only
    attention(q, q, q, rate, jax.random.key(0), 'auto', 'cpu')
    assert chosen == [want]


@pytest.mark.parametrize('dtype, rate, B, cudnn, hs, want', [
    (jnp.bfloat16, 0.0, 8, True, 64, 'cudnn'), (jnp.float16, 0.0, 8, True, 128, 'cudnn'),
    (jnp.bfloat16, 0.2, 8, True, 64, 'dense'), (jnp.float32, 0.0, 8, True, 64, 'dense'),
    (jnp.bfloat16, 0.0, 8, False, 64, 'dense'),  # a V100, a T4, an AMD GPU
    (jnp.bfloat16, 0.0, 8, True, 256, 'dense'), (jnp.bfloat16, 0.0, 8, True, 60, 'dense'),  # head sizes cuDNN lacks
    (jnp.bfloat16, 0.2, 128, True, 8, 'blockwise'), (jnp.float32, 0.0, 128, True, 8, 'blockwise'),  # 2 GiB of scores
])
def test_auto_on_gpu_takes_cudnn_where_it_runs(chosen, dtype, rate, B, cudnn, hs, want):
    """Elsewhere dense, until a layer's float32 scores (B, nh, T, T) outgrow 1 GiB."""
    q = jnp.zeros((B, 1024, 4, hs), dtype)
    attention(q, q, q, rate, jax.random.key(0), 'auto', 'gpu', cudnn)
    assert chosen == [want]


def test_the_rule_sees_one_devices_share_of_the_batch(chosen):
    """128 rows traced for 8 devices (XLA splits them, as with FSDP) are 16 rows a device: dense,
    where 128 rows of one device would be blockwise; and a TPU kernel XLA cannot split is not
    chosen there."""
    q = jnp.zeros((128, 1024, 4, 8), jnp.bfloat16)
    attention(q, q, q, 0.0, None, 'auto', 'gpu', False, 8)
    attention(q, q, q, 0.0, None, 'auto', 'gpu', False, 1)
    attention(q, q, q, 0.0, None, 'auto', 'tpu', False, 1)
    attention(q, q, q, 0.0, None, 'auto', 'tpu', False, 8)
    attention(q, q, q, 0.1, jax.random.key(0), 'auto', 'tpu', False, 1)  # the kernel has no dropout
    assert chosen == ['dense', 'blockwise', 'flash', 'dense', 'blockwise']


def test_forced_choices(chosen):
    q = jnp.zeros((2, 16, 4, 8))
    attention(q, q, q, 0.2, jax.random.key(0), 'blockwise', 'cpu')
    attention(q, q, q, 0.0, None, 'dense', 'gpu')
    attention(q, q, q, 0.0, None, 'flash', 'tpu')
    assert chosen == ['blockwise', 'dense', 'flash']
    with pytest.raises(ValueError, match='cudnn attention needs an NVIDIA GPU of compute capability 8.0'):
        attention(q.astype(jnp.bfloat16), q, q, 0.0, None, 'cudnn', 'gpu', False)
    with pytest.raises(ValueError, match='flash attention needs a TPU'):
        attention(q, q, q, 0.0, None, 'flash', 'cpu')
    with pytest.raises(ValueError, match='flash attention needs a TPU, no dropout'):
        attention(q, q, q, 0.1, jax.random.key(0), 'flash', 'tpu')
    with pytest.raises(ValueError, match='one of auto, dense'):
        attention(q, q, q, 0.0, None, 'splash', 'tpu')


@pytest.mark.parametrize('dtype, atol', [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_flash_attention_equals_dense(dtype, atol):
    """Pallas' TPU kernel, run on the CPU in interpret mode: values and every gradient as dense
    attention's in float32, causal, T = 200 not a multiple of its blocks of 128."""
    from jax.experimental.pallas import tpu as pltpu
    q, k, v, dy = qkv((2, 200, 2, 64))
    want, want_vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v), q, k, v)
    cast = lambda *xs: [x.astype(dtype) for x in xs]
    with pltpu.force_tpu_interpret_mode():
        y, vjp = jax.vjp(jax_attention.flash_attention, *cast(q, k, v))
        grads = vjp(*cast(dy))
    assert y.dtype == dtype and y.shape == q.shape
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=atol, rtol=0)
    for got, expected in zip(grads, want_vjp(dy)):
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=atol * 4, rtol=0)
