"""
Sampling from the GPT of jax_transformer.py, as nanoGPT's generate does it: with a key/value cache
up to block_size, then the model over the sliding window of the last block_size tokens.
"""

from functools import partial

import jax
import jax.numpy as jnp

from jax_transformer import GPT


def init_cache(config, batch_size):
    """An empty key/value cache for `batch_size` sequences of up to block_size tokens."""
    idx = jnp.zeros((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: GPT(config).init(jax.random.key(0), idx, decode=True)['cache'])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def sample_token(logits, key, temperature, top_k, top_p=1.0):
    """Sample from the last position's logits (B, 1, V) scaled by temperature, among the top_k
    most likely tokens (None = all), then among the fewest most likely tokens whose probabilities
    add up to top_p (nucleus sampling; 1.0 = all)."""
    logits = logits[:, -1, :] / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # (B, V), most likely first
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # the last kept token is the first whose cumulative probability reaches top_p
        last = jnp.minimum(jnp.sum(cumulative < top_p, axis=-1, keepdims=True), logits.shape[-1] - 1)
        logits = jnp.where(logits < jnp.take_along_axis(sorted_logits, last, axis=-1), -jnp.inf, logits)
    # a draw from softmax(logits), as torch.multinomial(probs, 1) in nanoGPT: the Gumbel-max trick
    return jnp.argmax(logits + jax.random.gumbel(key, logits.shape), axis=-1).astype(jnp.int32)  # (B,)


@partial(jax.jit, static_argnames=('config', 'max_new_tokens', 'top_k', 'top_p'))
def generate(params, config, idx, key, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0):
    """Complete the sequences idx (B, T) with max_new_tokens sampled tokens, like nanoGPT's
    generate: once a sequence is longer than block_size it is conditioned on its last block_size
    tokens. Up to block_size the key/value cache makes each new token cost one position;
    after that each token runs the model over the sliding window. Compiled once per shape."""
    B, T = idx.shape
    block = config.block_size
    model = GPT(config)
    seq = jnp.concatenate([idx.astype(jnp.int32), jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    keys = jax.random.split(key, max_new_tokens)
    # prefill the cache with the (cropped) prompt and sample the first new token
    context = min(T, block)
    (logits, _), variables = model.apply({'params': params, 'cache': init_cache(config, B)},
                                    seq[:, T - context:T], decode=True, mutable=['cache'])
    seq = seq.at[:, T].set(sample_token(logits, keys[0], temperature, top_k, top_p))
    n_cached = min(max_new_tokens - 1, block - context)  # tokens that still fit in the cache

    def cached_step(i, carry):  # writes the token at position T + i
        seq, cache = carry
        token = jax.lax.dynamic_slice_in_dim(seq, T + i - 1, 1, axis=1)  # (B, 1)
        (logits, _), variables = model.apply({'params': params, 'cache': cache}, token, decode=True,
                                        mutable=['cache'])
        seq = jax.lax.dynamic_update_slice_in_dim(
            seq, sample_token(logits, keys[i], temperature, top_k, top_p)[:, None], T + i, axis=1)
        return seq, variables['cache']

    def window_step(i, seq):  # the cache is full: condition on the last block_size tokens
        window = jax.lax.dynamic_slice_in_dim(seq, T + i - block, block, axis=1)
        logits, _ = model.apply({'params': params}, window)
        return jax.lax.dynamic_update_slice_in_dim(
            seq, sample_token(logits, keys[i], temperature, top_k, top_p)[:, None], T + i, axis=1)

    seq, _ = jax.lax.fori_loop(1, 1 + n_cached, cached_step, (seq, variables['cache']))
    if 1 + n_cached < max_new_tokens:  # traced only when the sequence outgrows block_size
        seq = jax.lax.fori_loop(1 + n_cached, max_new_tokens, window_step, seq)
    return seq
