"""
Causal self-attention for jax_transformer.py. q (B, T, nh, hs), k and v (B, Tk, nh, hs) in, as the
model makes them; (B, T, nh, hs) out, in v's dtype. Four ways to compute it:
- dense_attention: all (B, nh, T, Tk) scores at once, kept for the backward pass; the only one
  with the queries at any offset (the key/value cache);
- blockwise_attention: flash-style, one tile of scores at a time, recomputed in the backward pass
  from the rows' logsumexp: memory O(T), not O(T^2), and no work above the diagonal;
- cuDNN's fused kernel on NVIDIA GPUs, through jax.nn.dot_product_attention;
- flash_attention: Pallas' flash attention kernel on TPUs.
attention() picks one for training and evaluation, by the devices it is compiled for.
"""

import math
from functools import partial

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
    # the draws written out once: left to fuse, XLA computes each draw again for each of its 4 halves
    hi, lo = jax.lax.optimization_barrier(threefry2x32_p.bind(key_words[0], key_words[1], row, word))
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


# Blockwise attention works on H heads at a time, (H, T, hs), in tiles of bq queries x bk keys.

def einsum_f32(spec, a, b):
    """jnp.einsum(spec, a, b) summed in float32, whatever the inputs' dtype."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def causal_mask(i0, bq, j0, bk):
    """(bq, bk): whether key j0 + c comes at or before query i0 + r."""
    return (j0 + jnp.arange(bk))[None, :] <= (i0 + jnp.arange(bq))[:, None]


def tile_keep(key_words, rate, head_rows, i0, bq, j0, bk):
    """The (H, bq, bk) tile at query i0, key j0 of the heads' dropout masks; head_rows (H,) are
    the heads' first rows in the whole (B, nh, T, T) mask."""
    rows = head_rows[:, None] + (i0 + jnp.arange(bq)).astype(jnp.uint32)  # (H, bq)
    return dropout_tile_mask(key_words, rows, j0, bk, rate)


def blocks(x, start, size):
    """x[:, start:start + size], start traced."""
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def key_blocks_to_diagonal(i0, bq, bk):
    """How many key blocks queries i0..i0+bq see: those above the diagonal are skipped."""
    return -(-(i0 + bq) // bk)


def tiled_forward(q, k, v, head_rows, key_words, rate, bq, bk):
    """Output (H, Tq, hs) and the rows' logsumexp (H, Tq): for each block of queries an online
    softmax over the key blocks up to the diagonal."""
    H, Tq, hs = q.shape

    def query_block(i, carry):
        o, lse = carry
        i0 = i * bq
        q_blk = blocks(q, i0, bq)  # (H, bq, hs)

        def key_block(j, state):
            m, l, acc = state  # running max of the scores, sum of exp(score - m), (dropped) product with v
            j0 = j * bk
            s = einsum_f32('hqd,hkd->hqk', q_blk, blocks(k, j0, bk)) / math.sqrt(hs)  # (H, bq, bk)
            s = jnp.where(causal_mask(i0, bq, j0, bk), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=-1)
            if key_words is not None:
                p = dropped(p, tile_keep(key_words, rate, head_rows, i0, bq, j0, bk), rate)
            pv = einsum_f32('hqk,hkd->hqd', p.astype(v.dtype), blocks(v, j0, bk))
            return m_new, l, acc * correction[..., None] + pv

        state = jnp.full((H, bq), -jnp.inf), jnp.zeros((H, bq)), jnp.zeros((H, bq, hs))
        m, l, acc = jax.lax.fori_loop(0, key_blocks_to_diagonal(i0, bq, bk), key_block, state)
        o = jax.lax.dynamic_update_slice_in_dim(o, (acc / l[..., None]).astype(o.dtype), i0, axis=1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i0, axis=1)
        return o, lse

    return jax.lax.fori_loop(0, Tq // bq, query_block, (jnp.zeros((H, Tq, hs), v.dtype), jnp.zeros((H, Tq))))


def tiled_backward(q, k, v, head_rows, key_words, o, lse, do, rate, bq, bk):
    """dq, dk, dv, each tile's probabilities recomputed from the rows' logsumexp."""
    H, Tq, hs = q.shape
    # rowsum(dP * P) of each row, which dropout leaves equal to rowsum(dO * O)
    D = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # (H, Tq)

    def query_block(i, carry):
        dq, dk, dv = carry
        i0 = i * bq
        q_blk, do_blk = blocks(q, i0, bq), blocks(do, i0, bq)  # (H, bq, hs)
        lse_blk, D_blk = blocks(lse, i0, bq)[:, None, :], blocks(D, i0, bq)[:, None, :]  # (H, 1, bq)

        def key_block(j, state):
            dq_blk, dk, dv = state
            j0 = j * bk
            k_blk, v_blk = blocks(k, j0, bk), blocks(v, j0, bk)  # (H, bk, hs)
            # keys x queries tiles: XLA's CPU backend runs products over the first axis of both
            # operands at half speed, and this way only dq's is one (fwd+bwd ~5% faster)
            sT = einsum_f32('hkd,hqd->hkq', k_blk, q_blk) / math.sqrt(hs)
            sT = jnp.where(causal_mask(i0, bq, j0, bk).T, sT, -jnp.inf)
            pT = jnp.exp(sT - lse_blk)  # (H, bk, bq)
            dpT = einsum_f32('hkd,hqd->hkq', v_blk, do_blk)
            pT_dropped = pT
            if key_words is not None:
                keep = tile_keep(key_words, rate, head_rows, i0, bq, j0, bk).transpose(0, 2, 1)
                pT_dropped, dpT = dropped(pT, keep, rate), dropped(dpT, keep, rate)
            dsT = pT * (dpT - D_blk) / math.sqrt(hs)  # (H, bk, bq)
            dv_blk = einsum_f32('hkq,hqd->hkd', pT_dropped.astype(do.dtype), do_blk)
            dk_blk = einsum_f32('hkq,hqd->hkd', dsT.astype(q.dtype), q_blk)
            dq_blk = dq_blk + einsum_f32('hkq,hkd->hqd', dsT.astype(k.dtype), k_blk)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, blocks(dk, j0, bk) + dk_blk, j0, axis=1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, blocks(dv, j0, bk) + dv_blk, j0, axis=1)
            return dq_blk, dk, dv

        state = jnp.zeros((H, bq, hs)), dk, dv
        dq_blk, dk, dv = jax.lax.fori_loop(0, key_blocks_to_diagonal(i0, bq, bk), key_block, state)
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, i0, axis=1), dk, dv

    Tk = k.shape[1]
    grads = jnp.zeros((H, Tq, hs)), jnp.zeros((H, Tk, hs)), jnp.zeros((H, Tk, hs))
    dq, dk, dv = jax.lax.fori_loop(0, Tq // bq, query_block, grads)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def tiled_attention(q, k, v, head_rows, key_words, rate, bq, bk):
    """Causal attention of H heads, (H, Tq, hs) queries and (H, Tk, hs) keys and values, Tq a
    multiple of bq, Tk of bk and at least Tq. Dropout where key_words is not None."""
    return tiled_forward(q, k, v, head_rows, key_words, rate, bq, bk)[0]


def _tiled_fwd(q, k, v, head_rows, key_words, rate, bq, bk):
    o, lse = tiled_forward(q, k, v, head_rows, key_words, rate, bq, bk)
    return o, (q, k, v, head_rows, key_words, o, lse)


def _tiled_bwd(rate, bq, bk, residuals, do):
    q, k, v, head_rows, key_words, o, lse = residuals
    return *tiled_backward(q, k, v, head_rows, key_words, o, lse, do, rate, bq, bk), None, None


tiled_attention.defvjp(_tiled_fwd, _tiled_bwd)


def blockwise_attention(q, k, v, dropout_rate=0.0, dropout_key=None, block_q=128, block_k=128, tile_size=2 ** 16):
    """Causal attention (Tk == T), the same as dense_attention(q, k, v, 0, dropout_rate, dropout_key)
    up to rounding, dropout masks included, computed a tile at a time: block_q queries x block_k
    keys (a multiple of 4) of as many heads as keep a tile within tile_size scores, which then
    stay in a CPU's cache (2^16 floats: 256 KiB). T need not be a multiple of the blocks."""
    assert block_k % 4 == 0, "key blocks of whole dropout draws (4 columns each)"
    B, T, nh, hs = q.shape
    bq, bk = min(block_q, T), min(block_k, -(-T // 4) * 4)
    Tq = -(-T // bq) * bq  # queries padded to whole blocks
    Tk = -(-Tq // bk) * bk  # keys padded to the blocks that the last queries see, masked as keys after them
    # heads per tile: the most that divide B * nh and keep the tile within tile_size
    H = max(h for h in range(1, B * nh + 1) if (B * nh) % h == 0 and (h == 1 or h * bq * bk <= tile_size))
    G = B * nh // H  # groups of heads, run one after the other (lax.map)

    # group g holds heads g, g + G, g + 2G, ...: a batch sharded over devices (jit on sharded inputs)
    # then shards every group's H heads, if H is a multiple of the device count; groups of neighbouring
    # heads would split the batch itself, which XLA gathers onto every device
    def head_groups(x, length):  # (B, T, nh, hs) -> (G, H, length, hs), zero padded
        x = x.transpose(0, 2, 1, 3).reshape(H, G, T, hs).transpose(1, 0, 2, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - T), (0, 0)))
    head_rows = (jnp.arange(B * nh, dtype=jnp.uint32) * np.uint32(T)).reshape(H, G).T  # rows in the whole mask
    key_words = threefry_key(dropout_key) if dropout_key is not None and dropout_rate > 0.0 else None
    y = jax.lax.map(lambda group: tiled_attention(*group, key_words, dropout_rate, bq, bk),
                    (head_groups(q, Tq), head_groups(k, Tk), head_groups(v, Tk), head_rows))  # (G, H, Tq, hs)
    return y[:, :, :T].transpose(1, 0, 2, 3).reshape(B, nh, T, hs).transpose(0, 2, 1, 3)  # (B, T, nh, hs)


def flash_attention(q, k, v, block=128):
    """Causal attention by Pallas' flash attention kernel for TPUs (which runs on a CPU only under
    jax.experimental.pallas.tpu.force_tpu_interpret_mode). Its blocks of 128 queries and keys
    want T a multiple of 128: the sequence is padded, the keys after it being after every query
    (the causal mask hides them) and the queries after it cut off."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas  # Pallas' TPU code: on TPUs alone
    B, T, nh, hs = q.shape
    padded = -(-T // block) * block
    heads_first = lambda x: jnp.pad(x, ((0, 0), (0, padded - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    y = pallas.flash_attention(*map(heads_first, (q, k, v)), causal=True, sm_scale=1 / math.sqrt(hs))
    return y.transpose(0, 2, 1, 3)[:, :T]  # (B, T, nh, hs)


IMPLEMENTATIONS = ('auto', 'dense', 'blockwise', 'cudnn', 'flash')


def attention(q, k, v, dropout_rate, dropout_key, implementation, platform, cudnn=False, batch_shards=1):
    """Causal self-attention (Tk == T, no cache) by implementation, one of IMPLEMENTATIONS, compiled
    for devices of platform ('cpu', 'gpu' or 'tpu') that share the batch of q as batch_shards (1:
    q is one device's share; the device count: XLA splits the batch). Dropout when dropout_key is
    not None and the rate is not 0.
    - cuDNN runs on NVIDIA GPUs of compute capability 8.0 or more (cudnn), in bfloat16 or float16,
      head sizes multiples of 8 up to 128, without dropout;
    - flash on TPUs, without dropout, on each device's own rows (a kernel XLA cannot split);
    - 'auto' takes cuDNN or flash where they run; else on a CPU, blockwise above T = 64 once a
      device's B * nh * T * T scores outgrow 2^19 floats (2 MiB, the L2 cache of the AMD EPYC
      measured), and dense otherwise, where it measured faster (docs/performance.md); on GPUs and TPUs,
      dense as long as a device's float32 scores of a layer stay under 1 GiB, blockwise beyond."""
    B, T, nh, hs = q.shape
    B = max(1, B // batch_shards)  # one device's rows
    dropout = dropout_key is not None and dropout_rate > 0.0
    why_not = {
        'cudnn': "cudnn attention needs an NVIDIA GPU of compute capability 8.0 or more, bfloat16 or float16, a head "
                 "size that is a multiple of 8 up to 128, and no dropout"
                 if not (cudnn and q.dtype in (jnp.bfloat16, jnp.float16) and not dropout and hs % 8 == 0 and hs <= 128)
                 else None,
        'flash': "flash attention needs a TPU, no dropout and no --fsdp"
                 if not (platform == 'tpu' and not dropout and batch_shards == 1) else None,
    }
    if implementation == 'auto':
        if why_not['cudnn'] is None or why_not['flash'] is None:
            implementation = 'cudnn' if why_not['cudnn'] is None else 'flash'
        elif platform == 'cpu':
            implementation = 'blockwise' if T > 64 and B * nh * T * T > 2 ** 19 else 'dense'
        else:
            implementation = 'blockwise' if 4 * B * nh * T * T > 2 ** 30 else 'dense'
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: not one of {', '.join(IMPLEMENTATIONS)}")
    if why_not.get(implementation):
        raise ValueError(why_not[implementation])
    with jax.named_scope(f'{implementation}_attention'):  # names the choice in the compiled program
        if implementation == 'dense':
            return dense_attention(q, k, v, 0, dropout_rate, dropout_key)
        if implementation == 'blockwise':
            return blockwise_attention(q, k, v, dropout_rate, dropout_key)
        if implementation == 'flash':
            return flash_attention(q, k, v)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
