"""
Full definition of a GPT Language Model in Flax linen, all of it in this single file.
A port of nanoGPT's model.py. References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
"""

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    gelu_approximate: bool = False  # True: tanh GELU, the one OpenAI's GPT-2 weights were trained with
    dtype: str = 'float32'  # compute dtype; parameters are always float32


def dense(config, features, name, std=0.02):
    return nn.Dense(features, use_bias=config.bias, dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(stddev=std),
                    bias_init=nn.initializers.zeros, name=name)


def layer_norm(config, name):
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=jnp.dtype(config.dtype),
                        param_dtype=jnp.float32, name=name)


def residual_std(config):
    # GPT-2 paper: scale the init of the projections into the residual stream by 1/sqrt(2 * n_layer)
    return 0.02 / math.sqrt(2 * config.n_layer)


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic, decode, start):
        cfg = self.config
        B, T, C = x.shape
        hs = C // cfg.n_head
        # query, key, values for all heads in one batched projection
        qkv = dense(cfg, 3 * C, 'c_attn')(x)  # (B, T, 3C)
        q, k, v = [a.reshape(B, T, cfg.n_head, hs) for a in jnp.split(qkv, 3, axis=-1)]  # (B, T, nh, hs)
        q_pos = start + jnp.arange(T)
        if decode:
            # keys and values of earlier positions live in the cache; write this chunk at `start`
            cached_k = self.variable('cache', 'k', jnp.zeros, (B, cfg.block_size, cfg.n_head, hs), k.dtype)
            cached_v = self.variable('cache', 'v', jnp.zeros, (B, cfg.block_size, cfg.n_head, hs), v.dtype)
            cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
            cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
            k, v = cached_k.value, cached_v.value
        k_pos = jnp.arange(k.shape[1])
        mask = k_pos[None, :] <= q_pos[:, None]  # (T, Tk) causal
        # attention in float32: (B, nh, T, Tk)
        att = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(hs)
        att = jnp.where(mask, att, jnp.finfo(jnp.float32).min)
        att = jax.nn.softmax(att, axis=-1).astype(v.dtype)
        att = nn.Dropout(cfg.dropout)(att, deterministic=deterministic)
        y = jnp.einsum('bhqk,bkhd->bqhd', att, v).reshape(B, T, C)  # re-assemble all head outputs
        y = dense(cfg, C, 'c_proj', std=residual_std(cfg))(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.config
        x = dense(cfg, 4 * cfg.n_embd, 'c_fc')(x)
        x = nn.gelu(x, approximate=cfg.gelu_approximate)
        x = dense(cfg, cfg.n_embd, 'c_proj', std=residual_std(cfg))(x)
        return nn.Dropout(cfg.dropout)(x, deterministic=deterministic)


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic, decode, start):
        x = x + CausalSelfAttention(self.config, name='attn')(
            layer_norm(self.config, 'ln_1')(x), deterministic, decode, start)
        x = x + MLP(self.config, name='mlp')(layer_norm(self.config, 'ln_2')(x), deterministic)
        return x


class GPT(nn.Module):
    """GPT-2. Parameter names map one to one onto GPT-2's: wte, wpe, h_0.attn.c_attn, ..., ln_f.

    __call__(idx, targets=None) returns (logits, loss): with targets, logits for every position and
    the mean cross-entropy (targets of -1 are ignored); without, only the last position's logits
    (B, 1, vocab_size) and loss None. Dropout needs the 'dropout' rng when deterministic=False.
    decode=True runs on the key/value cache (collection 'cache', see init_cache) for sampling.
    """
    config: GPTConfig

    @nn.compact
    def __call__(self, idx, targets=None, deterministic=True, decode=False):
        cfg = self.config
        B, T = idx.shape
        assert T <= cfg.block_size, f"Cannot forward sequence of length {T}, block size is only {cfg.block_size}"
        if decode:
            index = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
            start = index.value
            index.value = start + T
        else:
            start = 0
        embed = partial(nn.Embed, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                        embedding_init=nn.initializers.normal(stddev=0.02))
        wte = embed(cfg.vocab_size, cfg.n_embd, name='wte')
        wpe = embed(cfg.block_size, cfg.n_embd, name='wpe')
        x = wte(idx) + wpe(start + jnp.arange(T))  # (B, T, C)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        for i in range(cfg.n_layer):
            x = Block(cfg, name=f'h_{i}')(x, deterministic, decode, start)
        x = layer_norm(cfg, 'ln_f')(x)
        if targets is None:
            x = x[:, -1:, :]  # inference-time mini-optimization: only the last position
        logits = wte.attend(x).astype(jnp.float32)  # lm_head tied to wte: (B, T, vocab_size)
        if targets is None:
            return logits, None
        return logits, cross_entropy(logits, targets)


def cross_entropy(logits, targets):
    """Mean cross-entropy over the targets that are not -1, in float32."""
    valid = targets != -1
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def init_params(config, key):
    """nanoGPT's init: N(0, 0.02) weights, c_proj N(0, 0.02/sqrt(2 n_layer)), zero biases."""
    idx = jnp.zeros((1, config.block_size), jnp.int32)
    return GPT(config).init(key, idx)['params']


def count_params(params, non_embedding=True):
    """Number of parameters. The position embeddings are left out by default, as in nanoGPT
    (the token embeddings are counted: they are tied to the final layer's weights)."""
    n_params = sum(p.size for p in jax.tree.leaves(params))
    if non_embedding:
        n_params -= params['wpe']['embedding'].size
    return n_params


def crop_block_size(params, config, block_size):
    """Model surgery to decrease the block size, e.g. to use GPT-2's 1024 weights on a smaller context."""
    assert block_size <= config.block_size
    params = dict(params, wpe={'embedding': params['wpe']['embedding'][:block_size]})
    return params, GPTConfig(**{**config.__dict__, 'block_size': block_size})


def flops_per_token(config, n_params):
    """Training flops per token (forward and backward), PaLM paper Appendix B."""
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    return 6 * n_params + 12 * L * H * Q * T


def estimate_mfu(config, n_params, fwdbwd_per_iter, dt, peak_flops):
    """Model flops utilization: achieved flops per second over `peak_flops` (all devices together)."""
    flops_per_iter = flops_per_token(config, n_params) * config.block_size * fwdbwd_per_iter
    return flops_per_iter / dt / peak_flops


# -----------------------------------------------------------------------------
# sampling, with a key/value cache

def init_cache(config, batch_size):
    """An empty key/value cache for `batch_size` sequences of up to block_size tokens."""
    idx = jnp.zeros((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: GPT(config).init(jax.random.key(0), idx, decode=True)['cache'])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def sample_token(logits, key, temperature, top_k):
    """Sample from the last position's logits (B, 1, V) scaled by temperature, top_k (None = all)."""
    logits = logits[:, -1, :] / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)  # (B,)


@partial(jax.jit, static_argnames=('config', 'max_new_tokens', 'top_k'))
def generate(params, config, idx, key, max_new_tokens, temperature=1.0, top_k=None):
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
    seq = seq.at[:, T].set(sample_token(logits, keys[0], temperature, top_k))
    n_cached = min(max_new_tokens - 1, block - context)  # tokens that still fit in the cache

    def cached_step(i, carry):  # writes the token at position T + i
        seq, cache = carry
        token = jax.lax.dynamic_slice_in_dim(seq, T + i - 1, 1, axis=1)  # (B, 1)
        (logits, _), variables = model.apply({'params': params, 'cache': cache}, token, decode=True,
                                        mutable=['cache'])
        seq = jax.lax.dynamic_update_slice_in_dim(
            seq, sample_token(logits, keys[i], temperature, top_k)[:, None], T + i, axis=1)
        return seq, variables['cache']

    def window_step(i, seq):  # the cache is full: condition on the last block_size tokens
        window = jax.lax.dynamic_slice_in_dim(seq, T + i - block, block, axis=1)
        logits, _ = model.apply({'params': params}, window)
        return jax.lax.dynamic_update_slice_in_dim(
            seq, sample_token(logits, keys[i], temperature, top_k)[:, None], T + i, axis=1)

    seq, _ = jax.lax.fori_loop(1, 1 + n_cached, cached_step, (seq, variables['cache']))
    seq = jax.lax.fori_loop(1 + n_cached, max_new_tokens, window_step, seq)
    return seq


# -----------------------------------------------------------------------------
# GPT-2 checkpoints in Hugging Face's layout (transformers' GPT2LMHeadModel state dict names)

def hf_name(path):
    """Flax param path ('h_0', 'attn', 'c_attn', 'kernel') -> 'transformer.h.0.attn.c_attn.weight'.
    HF's GPT-2 stores c_attn, c_fc, c_proj as Conv1D weights (in, out): the same layout as a
    Flax Dense kernel, so no transpose is needed."""
    *module, leaf = path
    if module[0].startswith('h_'):
        module = ['h', module[0][2:]] + list(module[1:])
    leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}[leaf]
    return '.'.join(['transformer'] + module + [leaf])


def param_paths(params):
    """(path, array) for every parameter, paths as tuples of names."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def params_from_hf(get_tensor, config):
    """Flax params for `config` from a GPT-2 checkpoint in HF's layout; get_tensor(name) returns
    one float array, so tensors can be streamed one at a time from a safetensors file."""
    shapes = jax.eval_shape(partial(init_params, config), jax.random.key(0))
    params = {}
    for path, shape in param_paths(shapes):
        w = jnp.asarray(get_tensor(hf_name(path)), dtype=jnp.float32)
        assert w.shape == shape.shape, f"{hf_name(path)}: shape {w.shape}, expected {shape.shape}"
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = w
    return params
