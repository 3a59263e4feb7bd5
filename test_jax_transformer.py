"""Tests of jax_transformer.py: the model against Hugging Face's GPT-2 (logits, loss, every gradient),
init, surgery, dropout, dtypes (sampling: test_jax_sampling.py). Only the tests that compare
with PyTorch need torch and transformers; without them they are skipped, saying so.
$ python test_jax_transformer.py   # these tests alone; python -m pytest runs them all
"""
import dataclasses
import math
import sys
from functools import partial

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jax_transformer import (GPT, GPTConfig, Dropout, init_params, count_params, crop_block_size, param_paths,
                             param_shapes, flops_per_token, cpu_matmul, dropout_mask, sorted_take)

TINY = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=48, bias=True)


def randomized(params, key, scale=0.1):
    """params with random LayerNorm and bias values too, so that every parameter matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) if p.ndim == 1 else p
                                     for p, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def params():
    return randomized(init_params(TINY, jax.random.key(0)), jax.random.key(1))


@pytest.fixture(scope='module')
def hf_and_params():
    """A random tiny GPT-2 from transformers (exact GELU, as nanoGPT) and its weights in our model."""
    torch = pytest.importorskip('torch', reason="the comparison with Hugging Face's GPT-2 needs torch")
    transformers = pytest.importorskip('transformers', reason="the comparison with Hugging Face needs transformers")
    from gpt2_weights import params_from_hf
    cfg = transformers.GPT2Config(vocab_size=TINY.vocab_size, n_positions=TINY.block_size, n_embd=TINY.n_embd,
                                  n_layer=TINY.n_layer, n_head=TINY.n_head, activation_function='gelu',
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).double().float().eval()
    with torch.no_grad():  # random LayerNorm and bias values, so that every parameter matters
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith('ln_1.weight') or
                                                       name.endswith('ln_2.weight') or
                                                       name.endswith('ln_f.weight') else 0.0))
    state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return hf, params_from_hf(state_dict.__getitem__, TINY)


# the model as compiled for a CPU (cpu_matmul, plain take) and for a GPU (sorted_take), here on the CPU
@pytest.mark.parametrize('platform', ['cpu', 'gpu'])
def test_logits_loss_and_gradients_match_hugging_face(hf_and_params, platform):
    import torch
    from gpt2_weights import hf_name
    config = dataclasses.replace(TINY, platform=platform)
    hf, params = hf_and_params
    rng = np.random.default_rng(0)
    idx = rng.integers(0, TINY.vocab_size, (3, TINY.block_size))
    targets = rng.integers(0, TINY.vocab_size, (3, TINY.block_size))
    targets[0, :7] = -1  # ignored positions

    def loss_fn(p):
        logits, loss = GPT(config).apply({'params': p}, jnp.array(idx), jnp.array(targets))
        return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    hf.zero_grad()
    hf_logits = hf(torch.tensor(idx)).logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.view(-1, TINY.vocab_size), torch.tensor(targets).view(-1),
                                                ignore_index=-1)
    hf_loss.backward()
    np.testing.assert_allclose(np.array(logits), hf_logits.detach().numpy(), atol=1e-5, rtol=0)
    assert abs(float(loss) - hf_loss.item()) < 1e-5
    hf_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    paths = param_paths(grads)
    assert len(paths) == len(hf_grads)  # every HF parameter has its counterpart
    for path, g in paths:
        np.testing.assert_allclose(np.array(g), hf_grads[hf_name(path)], atol=1e-5, rtol=0, err_msg=str(path))


@pytest.mark.parametrize('x_shape', [(12, 16), (3, 4, 16)])
def test_cpu_matmul_has_the_gradients_of_a_plain_product(x_shape):
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, (16, 24))
    dy = jax.random.normal(kd, x_shape[:-1] + (24,))
    for f in (cpu_matmul, jax.jit(cpu_matmul)):
        y, vjp = jax.vjp(f, x, w)
        want_y, want_vjp = jax.vjp(jnp.matmul, x, w)
        np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
        for got, want in zip(vjp(dy), want_vjp(dy)):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sorted_take_has_the_gradient_of_a_plain_take():
    # ids repeated as in text: a few ids make most of the tokens, some never come
    ids = jax.random.categorical(jax.random.key(0), jnp.linspace(0.0, -8.0, 65), shape=(8, 64))
    table = jax.random.normal(jax.random.key(1), (65, 32))
    dy = jax.random.normal(jax.random.key(2), (8, 64, 32))
    counts = np.bincount(np.ravel(ids), minlength=65)
    assert counts.max() > 40 and counts.min() == 0
    for f in (sorted_take, jax.jit(sorted_take)):
        y, vjp = jax.vjp(f, table, ids)
        want_y, want_vjp = jax.vjp(partial(jnp.take, axis=0), table, ids)
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_allclose(vjp(dy)[0], want_vjp(dy)[0], rtol=1e-6, atol=1e-6)


def test_dropout_drops_at_the_rate_and_scales_the_rest():
    rate, shape = 0.2, (16, 4, 64, 66)  # a last axis that is not a multiple of 4
    keep = np.asarray(dropout_mask(jax.random.key(0), shape, rate))
    n = keep.size
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs((1 - keep.mean()) - rate) < 5 * sigma
    for lane in range(4):  # each of the 4 uniforms a draw makes, and across rows
        assert abs((1 - keep[..., lane::4].mean()) - rate) < 5 * sigma * 2
    assert abs((1 - keep[::2].mean()) - (1 - keep[1::2].mean())) < 5 * sigma * 2
    both = np.mean(~keep[..., 0::2] & ~keep[..., 1::2])  # neighbours drop independently
    assert abs(both - rate ** 2) < 5 * math.sqrt(rate ** 2 / (n / 2))
    # the module: kept elements scaled by 1 / (1 - rate), as nn.Dropout, the mask from the 'dropout' rng
    x = jax.random.normal(jax.random.key(1), shape)
    y = np.asarray(Dropout(rate).apply({}, x, False, rngs={'dropout': jax.random.key(0)}))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    assert abs((1 - kept.mean()) - rate) < 5 * sigma
    assert Dropout(rate).apply({}, x, True) is x
    other = np.asarray(dropout_mask(jax.random.key(1), shape, rate))
    assert 0.25 < np.mean(keep != other) < 0.4  # another key, another mask: 2 * 0.2 * 0.8 differ


def test_without_targets_only_the_last_position(params):
    idx = jnp.array(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 10)))
    full, _ = GPT(TINY).apply({'params': params}, idx, jnp.zeros_like(idx))
    last, loss = GPT(TINY).apply({'params': params}, idx)
    assert last.shape == (2, 1, TINY.vocab_size) and loss is None
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_init_follows_nanogpt():
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256, bias=True)
    params = init_params(config, jax.random.key(0))
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for path, p in param_paths(params):
        p = np.asarray(p)
        if path[-1] == 'bias':
            assert np.all(p == 0), path
        elif path[-1] == 'scale':
            assert np.all(p == 1), path
        else:
            std = residual_std if path[-2] == 'c_proj' else 0.02
            assert abs(p.std() - std) < 0.05 * std and abs(p.mean()) < 0.1 * std, (path, p.std())
    n_embd, L, V, T = 256, 4, 512, 64
    per_layer = 4 * n_embd + 3 * n_embd * n_embd + 3 * n_embd + n_embd * n_embd + n_embd + \
        4 * n_embd * n_embd + 4 * n_embd + 4 * n_embd * n_embd + n_embd
    expected = V * n_embd + L * per_layer + 2 * n_embd
    assert count_params(params) == expected  # position embeddings are not counted
    assert count_params(params, non_embedding=False) == expected + T * n_embd
    assert flops_per_token(config, expected) == 6 * expected + 12 * L * 4 * 64 * T


def test_bias_false_has_no_biases():
    params = init_params(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, bias=False),
                         jax.random.key(0))
    assert not any(path[-1] == 'bias' for path, _ in param_paths(params))


def test_crop_block_size_keeps_short_context_logits(params):
    cropped, config = crop_block_size(params, TINY, 8)
    assert config.block_size == 8 and cropped['wpe']['embedding'].shape == (8, TINY.n_embd)
    idx = jnp.array(np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 8)))
    a, _ = GPT(TINY).apply({'params': params}, idx)
    b, _ = GPT(config).apply({'params': cropped}, idx)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_is_float32_to_bfloat16_precision(params):
    """dtype='bfloat16' (the default on GPUs and TPUs, and it runs on a CPU too): float32 params, the
    products in bfloat16, the loss in float32; the loss, logits and gradients are float32's within
    bfloat16's precision (8 bits of mantissa)."""
    idx = jax.random.randint(jax.random.key(2), (2, TINY.block_size), 0, TINY.vocab_size)
    targets = jax.random.randint(jax.random.key(3), (2, TINY.block_size), 0, TINY.vocab_size)

    @partial(jax.jit, static_argnums=0)
    def loss_and_grads(config):
        (loss, logits), grads = jax.value_and_grad(
            lambda p: GPT(config).apply({'params': p}, idx, targets)[::-1], has_aux=True)(params)
        return loss, logits, grads
    loss32, logits32, grads32 = loss_and_grads(TINY)
    loss16, logits16, grads16 = loss_and_grads(dataclasses.replace(TINY, dtype='bfloat16'))
    assert loss16.dtype == logits16.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    assert abs(float(loss16) - float(loss32)) < 0.02 and float(loss16) != float(loss32)
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.abs(logits32).max()))
    for (path, g16), (_, g32) in zip(param_paths(grads16), param_paths(grads32)):
        assert float(jnp.linalg.norm(g16 - g32)) < 0.05 * float(jnp.linalg.norm(g32)), path


def test_bfloat16_keeps_the_residual_stream_float32(params):
    """As under nanoGPT's autocast: each block computes in bfloat16 (its projections' outputs) and
    adds its output to a float32 stream, which the next block's layer norm reads."""
    idx = jnp.zeros((1, TINY.block_size), jnp.int32)
    config = dataclasses.replace(TINY, dtype='bfloat16')
    _, state = GPT(config).apply({'params': params}, idx, idx, capture_intermediates=True, mutable='intermediates')
    blocks = state['intermediates']
    assert blocks['wpe']['__call__'][0].dtype == jnp.float32  # the stream starts float32
    assert all(blocks[f'h_{i}']['__call__'][0].dtype == jnp.float32 for i in range(config.n_layer))
    assert blocks['h_0']['attn']['c_attn']['__call__'][0].dtype == jnp.bfloat16
    assert blocks['h_0']['mlp']['c_proj']['__call__'][0].dtype == jnp.bfloat16


@pytest.mark.parametrize('platform, dtype, precision', [
    ('tpu', 'float32', 'HIGHEST'), ('gpu', 'float32', 'HIGHEST'), ('tpu', 'bfloat16', 'DEFAULT'),
    ('cpu', 'float32', 'DEFAULT')])
def test_float32_means_float32_on_every_platform(platform, dtype, precision):
    """GPUs and TPUs take float32 products as TF32 or bfloat16 passes unless told: the model's
    products (projections, attention, lm_head) ask for full precision when the dtype is float32.
    A CPU computes float32 exactly either way, and its program stays as it was."""
    config = dataclasses.replace(TINY, dtype=dtype, platform=platform, attention='dense')
    idx = jnp.zeros((2, TINY.block_size), jnp.int32)
    text = jax.jit(lambda p: GPT(config).apply({'params': p}, idx, idx)[1]).lower(param_shapes(config)).as_text()
    dots = [line for line in text.splitlines() if 'dot_general' in line]
    assert len(dots) == 6 * config.n_layer + 1  # a layer's 4 projections, scores and output; the lm_head
    assert all(f'precision = [{precision}, {precision}]' in line for line in dots), dots[0]


def test_remat_gives_the_same_gradients(params):
    """remat=True recomputes each block in the backward pass: the same numbers, for less memory."""
    idx = jax.random.randint(jax.random.key(2), (2, TINY.block_size), 0, TINY.vocab_size)
    config = dataclasses.replace(TINY, dropout=0.1)
    grads = {remat: jax.jit(jax.grad(lambda p: GPT(dataclasses.replace(config, remat=remat)).apply(
        {'params': p}, idx, idx, deterministic=False, rngs={'dropout': jax.random.key(4)})[1]))(params)
        for remat in (False, True)}
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), grads[True], grads[False])


if __name__ == '__main__':
    # -rs: say which tests were skipped and why (those that compare with PyTorch, without torch);
    # -n 0: in this process. pytest warns that it cannot rewrite the asserts of plugins this file's
    # imports loaded first: harmless
    sys.exit(pytest.main([__file__, '-rs', '-n', '0', '-W', 'ignore::pytest.PytestAssertRewriteWarning'] +
                         sys.argv[1:]))
