"""
Full definition of a GPT Language Model in Flax linen, all of it in this single file.
A port of nanoGPT's model.py. References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.extend.random import threefry2x32_p


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
    remat: bool = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more compute


@jax.custom_vjp
def cpu_matmul(x, w):
    """x @ w (x: (..., C_in), w: (C_in, C_out)), differentiated as autodiff would, except that the
    weight gradient x^T @ dy reads x^T written out. Left to itself, XLA's CPU backend folds the
    transpose into the product and hands a product contracting over the first dimension of both
    operands to a generic kernel at about half the speed of its fast ones (the train step of the
    CPU config: 3-4 ms of ~35 faster, bench_jax.py)."""
    return x @ w


def _cpu_matmul_fwd(x, w):
    return x @ w, (x, w)


def _cpu_matmul_bwd(residuals, dy):
    x, w = residuals
    rows = x.reshape(-1, x.shape[-1])  # (B*T, C_in)
    # the barrier keeps XLA from folding the transpose back into the product
    rows_t = jax.lax.optimization_barrier(rows.T)  # (C_in, B*T)
    return dy @ w.T, rows_t @ dy.reshape(-1, dy.shape[-1])


cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def cpu_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    """nn.Dense's product (the last axis of x with the first of w) through cpu_matmul."""
    return cpu_matmul(x, w)


def dense(config, features, name, std=0.02):
    # GPUs and TPUs take any transposed operand at full speed: only the CPU needs cpu_matmul
    dot_general = cpu_dot_general if jax.default_backend() == 'cpu' else None
    return nn.Dense(features, use_bias=config.bias, dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32,
                    dot_general=dot_general,
                    kernel_init=nn.initializers.normal(stddev=std),
                    bias_init=nn.initializers.zeros, name=name)


def layer_norm(config, name):
    return nn.LayerNorm(epsilon=1e-5, use_bias=config.bias, dtype=jnp.dtype(config.dtype),
                        param_dtype=jnp.float32, name=name)


def residual_std(config):
    # GPT-2 paper: scale the init of the projections into the residual stream by 1/sqrt(2 * n_layer)
    return 0.02 / math.sqrt(2 * config.n_layer)


def dropout_mask(key, shape, rate):
    """A boolean mask of shape, False (drop) with probability rate rounded to a multiple of 2^-16
    (0.2 drops 13107/65536 = 0.199997), from any jax key. Each threefry draw (64 bits) gives four
    16-bit uniforms, where flax's nn.Dropout spends a whole draw and a float conversion on every
    element: random bits for the (B, nh, T, T) attention and every residual stream were a large
    part of a GPU step with dropout. The counters are positions in the mask, so that a sharded
    mask is the same as a whole one."""
    *lead, n = shape
    words_shape = (*lead, -(-n // 4))  # one draw per 4 elements of the last axis
    k1, k2 = jax.random.bits(key, (2,), jnp.uint32)  # a threefry key, whatever kind key is
    # the draw's counter: (row of the leading axes, word in the row)
    strides = np.cumprod([1] + lead[::-1])[::-1][1:]
    row = sum((jax.lax.broadcasted_iota(jnp.uint32, words_shape, d) * np.uint32(stride)
               for d, stride in enumerate(strides)), jnp.zeros(words_shape, jnp.uint32))
    col = jax.lax.broadcasted_iota(jnp.uint32, words_shape, len(lead))
    hi, lo = threefry2x32_p.bind(k1, k2, row, col)
    halves = jnp.stack([hi >> 16, hi & 0xFFFF, lo >> 16, lo & 0xFFFF], axis=-1)  # (*lead, words, 4)
    uniforms = halves.reshape(*lead, -1)[..., :n]  # 16-bit uniforms, (*lead, n)
    return uniforms >= np.uint32(round(rate * 2 ** 16))


class Dropout(nn.Module):
    """nn.Dropout (zero with probability rate, scale the rest by 1 / (1 - rate), identity when
    deterministic) on dropout_mask's cheaper random bits, from the 'dropout' rng."""
    rate: float

    @nn.compact
    def __call__(self, x, deterministic):
        if deterministic or self.rate == 0.0:
            return x
        keep = dropout_mask(self.make_rng('dropout'), x.shape, self.rate)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


def sorted_take(table, ids):
    """table[ids] (ids (B, T) -> (B, T, C)), computed so that its gradient is fast on GPUs. Text
    repeats ids (a space is ~15% of Shakespeare's characters), and the gradient of a plain take
    is a scatter-add whose atomic adds collide on those rows. Here the rows are gathered in
    sorted id order, so autodiff's scatter-add gets sorted indices, which XLA's GPU emitter
    sums in registers over each run of equal ids; putting the rows back in the tokens' order
    is a permutation, a scatter without collisions. The gradient is the same sum."""
    flat = ids.reshape(-1)
    order = jnp.argsort(flat)
    rows = table.at[flat[order]].get(indices_are_sorted=True)  # (B*T, C), in id order
    x = rows.at[jnp.argsort(order)].get(unique_indices=True)  # (B*T, C), in token order
    return x.reshape(*ids.shape, table.shape[-1])


def take_tokens(table, ids):
    """The token embeddings table[ids]: sorted_take on GPUs. A CPU adds up the plain take's
    gradient quickly and would only pay for the sorts (the lookup and its gradient in the CPU
    config: 0.17 ms plain, 0.37 ms sorted)."""
    return sorted_take(table, ids) if jax.default_backend() == 'gpu' else jnp.take(table, ids, axis=0)


def use_cudnn_attention(config, deterministic, decode):
    """cuDNN's fused (flash) attention: on NVIDIA GPUs, in bfloat16, without attention dropout.
    The key/value cache keeps the plain path, whose mask follows the cache's position."""
    return (jax.default_backend() == 'gpu' and config.dtype == 'bfloat16' and not decode
            and (deterministic or config.dropout == 0.0))


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
        if use_cudnn_attention(cfg, deterministic, decode):
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')  # (B, T, nh, hs)
        else:
            # on CPU this plain path measured faster than jax.nn.dot_product_attention's 'xla' one
            k_pos = jnp.arange(k.shape[1])
            mask = k_pos[None, :] <= q_pos[:, None]  # (T, Tk) causal
            # attention in float32: (B, nh, T, Tk)
            att = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(hs)
            att = jnp.where(mask, att, jnp.finfo(jnp.float32).min)
            att = jax.nn.softmax(att, axis=-1).astype(v.dtype)
            att = Dropout(cfg.dropout)(att, deterministic)
            y = jnp.einsum('bhqk,bkhd->bqhd', att, v)
        y = y.reshape(B, T, C)  # re-assemble all head outputs
        y = dense(cfg, C, 'c_proj', std=residual_std(cfg))(y)
        return Dropout(cfg.dropout)(y, deterministic)


def gelu_exact(x):
    """The exact (erf) GELU, as nn.gelu(approximate=False) computes it within 5e-7, but through erf,
    not erfc: XLA's CPU erf is 2.5x faster (the train step of the CPU config: 1.5-2.5% faster)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2))))


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.config
        B, T, C = x.shape
        # on (B*T, C) rows: with (B, T, C) XLA's CPU backward writes the GELU gradient transposed
        # in a slow loop (forward+backward of the CPU config: 67 -> 49 ms)
        x = dense(cfg, 4 * C, 'c_fc')(x.reshape(B * T, C))
        x = nn.gelu(x, approximate=True) if cfg.gelu_approximate else gelu_exact(x)
        x = dense(cfg, C, 'c_proj', std=residual_std(cfg))(x).reshape(B, T, C)
        return Dropout(cfg.dropout)(x, deterministic)


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
        # the lookup in float32 then cast, as nn.Embed's cast then lookup: the gradient sums in float32
        tok_emb = take_tokens(wte.embedding, idx).astype(cfg.dtype)  # (B, T, C)
        x = tok_emb + wpe(start + jnp.arange(T))  # (B, T, C)
        x = Dropout(cfg.dropout)(x, deterministic)
        # static_argnums counts self: deterministic, decode are Python bools
        block = nn.remat(Block, static_argnums=(2, 3)) if cfg.remat else Block
        for i in range(cfg.n_layer):
            x = block(cfg, name=f'h_{i}')(x, deterministic, decode, start)
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


def param_shapes(config):
    """The shapes and dtypes of the params of config, without computing them."""
    return jax.eval_shape(partial(init_params, config), jax.random.key(0))


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
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)  # (B,)


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
    shapes = param_shapes(config)
    params = {}
    for path, shape in param_paths(shapes):
        w = jnp.asarray(get_tensor(hf_name(path)), dtype=jnp.float32)
        if w.shape != shape.shape:
            raise ValueError(f"{hf_name(path)} has shape {w.shape}, but the model's is {shape.shape}")
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = w
    return params


def params_to_hf(params, config):
    """The state dict of transformers' GPT2LMHeadModel for params, float32 NumPy arrays: the inverse
    of params_from_hf. lm_head.weight is left out, as save_pretrained does: it is tied to
    transformer.wte.weight. HF's GPT-2 always has biases: a bias=False model gets zeros there,
    which compute the same."""
    state = {}
    for path, w in param_paths(params):
        state[hf_name(path)] = np.asarray(w, dtype=np.float32)
        if not config.bias and path[-1] in ('kernel', 'scale'):
            state[hf_name(path[:-1] + ('bias',))] = np.zeros(w.shape[-1], np.float32)
    return state


# -----------------------------------------------------------------------------
# nanoGPT's own checkpoints (the state dict of its model.py's GPT). Its names are Hugging Face's
# (hf_name), but its c_attn, c_fc and c_proj are nn.Linear, whose weights are (out, in): the
# transpose of a Flax Dense kernel.

NANOGPT_MODEL_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')


def nanogpt_param_names(config):
    """The names of nanoGPT's model.named_parameters() for config, in its order, which its
    optimizer's parameter ids follow. lm_head.weight is not one: it is transformer.wte.weight."""
    block = ['ln_1.weight', 'ln_1.bias', 'attn.c_attn.weight', 'attn.c_attn.bias', 'attn.c_proj.weight',
             'attn.c_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.c_fc.weight', 'mlp.c_fc.bias',
             'mlp.c_proj.weight', 'mlp.c_proj.bias']
    names = ['transformer.wte.weight', 'transformer.wpe.weight']
    names += [f'transformer.h.{i}.{name}' for i in range(config.n_layer) for name in block]
    names += ['transformer.ln_f.weight', 'transformer.ln_f.bias']
    return [n for n in names if config.bias or not n.endswith('.bias')]


def params_from_nanogpt(state_dict, config):
    """Flax params for config from nanoGPT's model.state_dict() (NumPy arrays, a compiled model's
    `_orig_mod.` prefix removed), or from its AdamW moments under the same names. lm_head.weight
    (tied to wte) and the causal mask buffers of models without flash attention (attn.bias) are
    not parameters here. ValueError when the tensors are not those of config."""
    expected = {hf_name(path) for path, _ in param_paths(param_shapes(config))}
    other = [k for k in state_dict if k not in expected and k != 'lm_head.weight' and not k.endswith('.attn.bias')]
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ValueError(f"it has no {missing[0]}")
    if other:
        raise ValueError(f"it has {other[0]}, which the model has not")
    transpose = lambda name: name.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight'))
    return params_from_hf(lambda name: state_dict[name].T if transpose(name) else state_dict[name], config)


def params_to_nanogpt(params):
    """nanoGPT's named parameters for params, {name: float32 NumPy array}: the inverse of
    params_from_nanogpt. Its model.state_dict() also holds lm_head.weight, the same array as
    transformer.wte.weight; its AdamW moments are in this layout too."""
    state = {}
    for path, w in param_paths(params):
        w = np.asarray(w, dtype=np.float32)
        state[hf_name(path)] = np.ascontiguousarray(w.T) if path[-1] == 'kernel' else w
    return state


# -----------------------------------------------------------------------------
# OpenAI's GPT-2 weights, from the Hugging Face hub or a local folder, and back

GPT2_MODELS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
# transformers' names of the GELUs: True for the tanh approximation OpenAI's GPT-2 was trained with
HF_GELUS = {'gelu': False, 'gelu_python': False, 'gelu_new': True, 'gelu_pytorch_tanh': True, 'gelu_fast': True}


def gpt_config_from_hf(hf, dropout=0.0, dtype='float32'):
    """The GPTConfig of a transformers GPT2Config, given as the dict of its config.json.
    ValueError for a variant of GPT-2 that this model does not compute."""
    if hf.get('model_type') != 'gpt2':
        raise ValueError(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    activation = hf.get('activation_function', 'gelu_new')
    if activation not in HF_GELUS:
        raise ValueError(f"activation_function {activation!r} is not one of {', '.join(HF_GELUS)}")
    n_embd = hf.get('n_embd', 768)
    # GPT-2's options, at the values GPT computes with (transformers' defaults)
    fixed = {'layer_norm_epsilon': 1e-5, 'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
             'add_cross_attention': False, 'tie_word_embeddings': True}
    other = [k for k, v in fixed.items() if hf.get(k, v) != v]
    other += ['n_inner'] if hf.get('n_inner') not in (None, 4 * n_embd) else []
    if other:
        raise ValueError(f"this GPT-2 has settings the model here does not support: {', '.join(other)}")
    return GPTConfig(block_size=hf.get('n_positions', 1024), vocab_size=hf.get('vocab_size', 50257),
                     n_layer=hf.get('n_layer', 12), n_head=hf.get('n_head', 12), n_embd=n_embd,
                     dropout=dropout, bias=True, gelu_approximate=HF_GELUS[activation], dtype=dtype)


def hf_config(config):
    """config.json of transformers' GPT2LMHeadModel for config: the inverse of gpt_config_from_hf."""
    eot = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocab has it
    return {
        'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'],
        'vocab_size': config.vocab_size, 'n_positions': config.block_size, 'n_embd': config.n_embd,
        'n_layer': config.n_layer, 'n_head': config.n_head, 'n_inner': None,
        'activation_function': 'gelu_new' if config.gelu_approximate else 'gelu',
        'resid_pdrop': config.dropout, 'embd_pdrop': config.dropout, 'attn_pdrop': config.dropout,
        'layer_norm_epsilon': 1e-5, 'initializer_range': 0.02, 'tie_word_embeddings': True,
        'bos_token_id': eot, 'eos_token_id': eot, 'dtype': 'float32',
    }


def hf_files(name_or_path):
    """Paths of the config.json and the safetensors file(s) of one of GPT2_MODELS, downloaded
    from the Hugging Face hub (or found in its cache), or of a folder written by save_pretrained."""
    if name_or_path in GPT2_MODELS:
        from huggingface_hub import hf_hub_download
        repo = f'openai-community/{name_or_path}'
        try:
            return hf_hub_download(repo, 'config.json'), [hf_hub_download(repo, 'model.safetensors')]
        except OSError as e:  # no network and not in the cache, or the hub refused
            raise ValueError(f"cannot get {repo} from the Hugging Face hub ({type(e).__name__}): "
                             f"fill its cache while online, or pass a local folder") from None
    if not os.path.isdir(name_or_path):
        raise ValueError(f"{name_or_path!r} is neither one of {', '.join(GPT2_MODELS)} nor a folder")
    config_path = os.path.join(name_or_path, 'config.json')
    weights = os.path.join(name_or_path, 'model.safetensors')
    index = weights + '.index.json'  # a large model saved in shards
    if not os.path.isfile(config_path):
        raise ValueError(f"{name_or_path} has no config.json: not a Hugging Face GPT-2 folder")
    if os.path.isfile(weights):
        return config_path, [weights]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        return config_path, [os.path.join(name_or_path, shard) for shard in shards]
    raise ValueError(f"{name_or_path} has no model.safetensors")


def safetensors_reader(paths, stack):
    """get_tensor(name) for params_from_hf, reading one tensor at a time from the safetensors
    files `paths`, which stay open in the ExitStack `stack`. OpenAI's files on the hub name the
    tensors of GPT2Model ('h.0.attn.c_attn.weight'), save_pretrained those of GPT2LMHeadModel
    ('transformer.h.0.attn.c_attn.weight'): both work."""
    from safetensors import safe_open
    files = {}
    for path in paths:
        f = stack.enter_context(safe_open(path, framework='numpy'))
        files.update(dict.fromkeys(f.keys(), f))
    prefix = 'transformer.' if 'transformer.wte.weight' in files else ''

    def get_tensor(name):
        key = prefix + name.removeprefix('transformer.')
        if key not in files:
            raise ValueError(f"{', '.join(paths)} has no tensor {key}: not a GPT-2 of its config.json")
        return files[key].get_tensor(key)
    return get_tensor


def from_pretrained(name_or_path, dropout=None, dtype='float32'):
    """(GPTConfig, params) of OpenAI's GPT-2: 'gpt2', 'gpt2-medium', 'gpt2-large' or 'gpt2-xl'
    from the Hugging Face hub (its cache and HF_HUB_OFFLINE work as usual), or a GPT-2 folder as
    transformers' save_pretrained writes it (config.json, model.safetensors). The tensors are read
    one at a time, so this needs little more host memory than the model itself.
    dropout overrides the config's 0.0, dtype is the compute dtype. ValueError, with a one-line
    message, when there is no such model or it is not a GPT-2 this model can compute."""
    print(f"loading weights from pretrained gpt: {name_or_path}")
    config_path, weight_paths = hf_files(name_or_path)
    try:
        with open(config_path) as f:
            config = gpt_config_from_hf(json.load(f), dropout or 0.0, dtype)
    except ValueError as e:  # not JSON, or not a GPT-2
        raise ValueError(f"{config_path}: {e}") from None
    if name_or_path in GPT2_MODELS:
        print(f"forcing vocab_size={config.vocab_size}, block_size={config.block_size}, bias=True")
    if dropout is not None:
        print(f"overriding dropout rate to {dropout}")
    with contextlib.ExitStack() as stack:
        params = params_from_hf(safetensors_reader(weight_paths, stack), config)
    return config, params
