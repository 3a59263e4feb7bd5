"""Tests of jax_transformer.py: the model against Hugging Face's GPT-2, init, surgery, sampling.
$ python test_jax_transformer.py   # these tests alone; python -m pytest runs them all
"""
import math
import sys
from functools import partial

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jax_transformer
from jax_transformer import (GPT, GPTConfig, Dropout, init_params, count_params, crop_block_size, params_from_hf,
                             param_paths, hf_name, generate, sample_token, flops_per_token, cpu_matmul, dropout_mask,
                             sorted_take)

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TINY = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=48, bias=True)


@pytest.fixture(scope='module')
def hf_and_params():
    """A random tiny GPT-2 from transformers (exact GELU, as nanoGPT) and its weights in our model."""
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


@pytest.mark.parametrize('take_tokens', ['take_tokens', 'sorted_take'])  # the CPU's lookup, and the GPU's
def test_logits_loss_and_gradients_match_hugging_face(hf_and_params, take_tokens, monkeypatch):
    monkeypatch.setattr(jax_transformer, 'take_tokens', getattr(jax_transformer, take_tokens))
    hf, params = hf_and_params
    rng = np.random.default_rng(0)
    idx = rng.integers(0, TINY.vocab_size, (3, TINY.block_size))
    targets = rng.integers(0, TINY.vocab_size, (3, TINY.block_size))
    targets[0, :7] = -1  # ignored positions

    def loss_fn(p):
        logits, loss = GPT(TINY).apply({'params': p}, jnp.array(idx), jnp.array(targets))
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


def test_without_targets_only_the_last_position(hf_and_params):
    _, params = hf_and_params
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


def test_crop_block_size_keeps_short_context_logits(hf_and_params):
    _, params = hf_and_params
    cropped, config = crop_block_size(params, TINY, 8)
    assert config.block_size == 8 and cropped['wpe']['embedding'].shape == (8, TINY.n_embd)
    idx = jnp.array(np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 8)))
    a, _ = GPT(TINY).apply({'params': params}, idx)
    b, _ = GPT(config).apply({'params': cropped}, idx)
    np.testing.assert_allclose(a, b, atol=1e-6)


@partial(jax.jit, static_argnums=1)
def padded_logits_at(params, config, padded, t):
    logits, _ = GPT(config).apply({'params': params}, padded, jnp.zeros_like(padded))
    return jax.lax.dynamic_slice_in_dim(logits, t - 1, 1, axis=1)  # (B, 1, V)


def no_cache_logits(params, config, idx):
    """nanoGPT's forward for the next token, without a cache: the model over the last block_size
    tokens. The window is right-padded to block_size so that one compiled forward serves every
    length (causal attention: the padding cannot change the logits of the positions before it)."""
    window = np.asarray(idx[:, -config.block_size:])
    t = window.shape[1]
    return padded_logits_at(params, config, jnp.asarray(np.pad(window, ((0, 0), (0, config.block_size - t)))), t)


def reference_generate(params, config, idx, key, max_new_tokens, temperature, top_k, top_p):
    """nanoGPT's generate: run the model on the last block_size tokens for every new token."""
    keys = jax.random.split(key, max_new_tokens)
    for i in range(max_new_tokens):
        logits = no_cache_logits(params, config, idx)
        idx = jnp.concatenate([idx, sample_token(logits, keys[i], temperature, top_k, top_p)[:, None]], axis=1)
    return idx


@pytest.mark.parametrize('prompt_len,max_new_tokens', [(5, 12), (20, 30), (40, 6)])
def test_cached_generation_matches_nanogpt_generate(hf_and_params, prompt_len, max_new_tokens):
    # (20, 30) goes past block_size 32 mid-way; (40, 6) starts with a prompt longer than block_size
    _, params = hf_and_params
    idx = jnp.array(np.random.default_rng(3).integers(0, TINY.vocab_size, (2, prompt_len)), dtype=jnp.int32)
    key = jax.random.key(7)
    for temperature, top_k, top_p in ((1.0, 5, 1.0), (0.8, None, 1.0), (1.0, 20, 0.6)):
        got = generate(params, TINY, idx, key, max_new_tokens, temperature, top_k, top_p)
        want = reference_generate(params, TINY, idx, key, max_new_tokens, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.array(got), np.array(want))


def test_greedy_cached_decoding_equals_full_forward_argmax(hf_and_params):
    # top_k=1 is greedy: every token is the argmax of a full forward (no cache) over the last
    # block_size tokens, before the cache is full (t < 32) and after (the sliding window)
    _, params = hf_and_params
    idx = jnp.array(np.random.default_rng(4).integers(0, TINY.vocab_size, (2, 3)), dtype=jnp.int32)
    out = generate(params, TINY, idx, jax.random.key(0), 40, 1.0, 1)
    for t in range(3, 43):
        logits = no_cache_logits(params, TINY, out[:, :t])
        np.testing.assert_array_equal(out[:, t], jnp.argmax(logits[:, -1], axis=-1), err_msg=f"position {t}")


def test_top_p_keeps_the_fewest_tokens_adding_up_to_p():
    logits = jnp.log(jnp.array([[[0.05, 0.5, 0.15, 0.3]]]))  # (1, 1, 4)
    keys = jax.random.split(jax.random.key(0), 4000)
    for top_p, kept in ((0.4, [1]), (0.7, [1, 3]), (0.9, [1, 3, 2]), (1.0, [1, 3, 2, 0])):
        tokens = jax.vmap(lambda k: sample_token(logits, k, 1.0, None, top_p))(keys)
        freq = np.bincount(np.ravel(tokens), minlength=4) / len(keys)
        want = np.zeros(4)
        want[kept] = np.exp(np.asarray(logits[0, 0]))[kept] / np.exp(np.asarray(logits[0, 0]))[kept].sum()
        np.testing.assert_allclose(freq, want, atol=0.03, err_msg=f"top_p {top_p}")


if __name__ == '__main__':
    # pytest warns that it cannot rewrite the asserts of plugins this file's imports loaded first: harmless
    sys.exit(pytest.main([__file__, '-W', 'ignore::pytest.PytestAssertRewriteWarning'] + sys.argv[1:]))
