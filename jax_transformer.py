"""
Full definition of a GPT Language Model in Flax linen, all of it in this single file.
A port of nanoGPT's model.py; its generate is in jax_sampling.py. References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
"""

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn

from jax_attention import attention, dense_attention, dropout_mask


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
    attention: str = 'auto'  # 'auto', 'dense', 'blockwise' or 'cudnn': see jax_attention.attention
    # the devices it is compiled for (jax_train_utils.compiled_for sets these from a mesh): 'cpu', 'gpu' or 'tpu'
    # ('' JAX's default backend), whether cuDNN's fused attention runs there, and how many devices share the
    # batch it is traced with (1: each traces its own rows; more: XLA splits the batch, as with FSDP)
    platform: str = ''
    cudnn: bool = False
    batch_shards: int = 1


# the fields of GPTConfig that the weights were trained with: a resumed or fine-tuned run takes them
# from its checkpoint; the others (dropout, dtype, remat, attention and the devices) are the run's own
ARCHITECTURE_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'gelu_approximate')


def platform(config):
    """The platform of the devices the model is compiled for, which may not be the devices at hand
    (compile_jax.py compiles for GPUs and TPUs that are not there): the scripts set config.platform
    from their mesh; where it is not set, JAX's default backend."""
    return config.platform or jax.default_backend()


@jax.custom_vjp
def cpu_matmul(x, w):
    """x @ w (x: (..., C_in), w: (C_in, C_out)), differentiated as autodiff would, except that the
    weight gradient x^T @ dy reads x^T written out. Left to itself, XLA's CPU backend folds the
    transpose into the product and hands a product contracting over the first dimension of both
    operands to a generic kernel at about half the speed of its fast ones (docs/performance.md)."""
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
    dot_general = cpu_dot_general if platform(config) == 'cpu' else None
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


def take_tokens(table, ids, platform):
    """The token embeddings table[ids]: sorted_take on GPUs. A CPU adds up the plain take's
    gradient quickly and would only pay for the sorts."""
    return sorted_take(table, ids) if platform == 'gpu' else jnp.take(table, ids, axis=0)


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
        if decode:
            # keys and values of earlier positions live in the cache; write this chunk at `start`
            cached_k = self.variable('cache', 'k', jnp.zeros, (B, cfg.block_size, cfg.n_head, hs), k.dtype)
            cached_v = self.variable('cache', 'v', jnp.zeros, (B, cfg.block_size, cfg.n_head, hs), v.dtype)
            cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
            cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
            k, v = cached_k.value, cached_v.value
            y = dense_attention(q, k, v, q_offset=start)  # (B, T, nh, hs), the queries after the cache
        else:
            dropout_key = None if deterministic or cfg.dropout == 0.0 else self.make_rng('dropout')
            y = attention(q, k, v, cfg.dropout, dropout_key, cfg.attention, platform(cfg), cfg.cudnn,
                          cfg.batch_shards)  # (B, T, nh, hs)
        y = y.reshape(B, T, C)  # re-assemble all head outputs
        y = dense(cfg, C, 'c_proj', std=residual_std(cfg))(y)
        return Dropout(cfg.dropout)(y, deterministic)


def gelu_exact(x):
    """The exact (erf) GELU, as nn.gelu(approximate=False) computes it within 5e-7, but through erf,
    not erfc, which is much slower in XLA's CPU backend."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2))))


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic):
        cfg = self.config
        B, T, C = x.shape
        # on (B*T, C) rows: with (B, T, C) XLA's CPU backward writes the GELU gradient transposed
        # in a slow loop
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
    decode=True runs on the key/value cache (collection 'cache', see jax_sampling.init_cache) for sampling.
    """
    config: GPTConfig

    @nn.compact
    def __call__(self, idx, targets=None, deterministic=True, decode=False):
        cfg = self.config
        B, T = idx.shape
        assert T <= cfg.block_size, f"Cannot forward sequence of length {T}, block size is only {cfg.block_size}"
        # float32 means float32 on GPUs and TPUs too, whose products otherwise take TF32 or bfloat16 passes
        full_precision = cfg.dtype == 'float32' and platform(cfg) != 'cpu'
        with jax.default_matmul_precision('float32') if full_precision else contextlib.nullcontext():
            if decode:
                index = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
                start = index.value
                index.value = start + T
            else:
                start = 0
            embed = partial(nn.Embed, param_dtype=jnp.float32, embedding_init=nn.initializers.normal(stddev=0.02))
            wte = embed(cfg.vocab_size, cfg.n_embd, dtype=jnp.dtype(cfg.dtype), name='wte')  # its attend computes in dtype
            wpe = embed(cfg.block_size, cfg.n_embd, dtype=jnp.float32, name='wpe')
            # the residual stream stays float32 whatever the compute dtype, as under nanoGPT's autocast: each
            # block computes in dtype from its layer norm on, and adds its output to the float32 stream
            tok_emb = take_tokens(wte.embedding, idx, platform(cfg))  # (B, T, C)
            x = tok_emb + wpe(start + jnp.arange(T))  # (B, T, C)
            x = Dropout(cfg.dropout)(x, deterministic)
            # static_argnums counts self: deterministic, decode are Python bools
            block = nn.remat(Block, static_argnums=(2, 3)) if cfg.remat else Block
            for i in range(cfg.n_layer):
                x = block(cfg, name=f'h_{i}')(x, deterministic, decode, start)
            x = layer_norm(cfg, 'ln_f')(x)
            if targets is None:
                x = x[:, -1:, :]  # inference-time mini-optimization: only the last position
            logits = wte.attend(x)  # lm_head tied to wte: (B, T, vocab_size), in the compute dtype
            loss = None if targets is None else cross_entropy(logits, targets)
            return logits.astype(jnp.float32), loss


@jax.custom_vjp
def cross_entropy(logits, targets):
    """Mean cross-entropy over the targets that are not -1, in float32 from logits of any dtype. Its
    gradient, in the logits' dtype, is recomputed from the logits and each row's logsumexp: no
    float32 copy of the (B, T, vocab_size) logits is kept for it, as autodiff of log_softmax keeps."""
    return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
    valid = targets != -1
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)  # (B, T)
    target_logits = jnp.take_along_axis(logits32, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    loss = jnp.sum((lse - target_logits) * valid) / jnp.maximum(jnp.sum(valid), 1)
    return loss, (logits, lse, targets)


def _cross_entropy_bwd(residuals, g):
    logits, lse, targets = residuals
    valid = targets != -1
    scale = valid * g / jnp.maximum(jnp.sum(valid), 1)  # (B, T)
    softmax = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    one_hot = jnp.arange(logits.shape[-1]) == targets[..., None]
    return ((softmax - one_hot) * scale[..., None]).astype(logits.dtype), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@partial(jax.jit, static_argnums=0)  # compiled: op by op, the first init of a model takes seconds
def init_params(config, key):
    """nanoGPT's init: N(0, 0.02) weights, c_proj N(0, 0.02/sqrt(2 n_layer)), zero biases."""
    idx = jnp.zeros((1, config.block_size), jnp.int32)
    return GPT(config).init(key, idx)['params']


def param_shapes(config):
    """The shapes and dtypes of the params of config, without computing them."""
    return jax.eval_shape(partial(init_params, config), jax.random.key(0))


def param_paths(params):
    """(path, array) for every parameter, paths as tuples of names."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


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

