"""
Sampling from the GPT of jax_transformer.py as nanoGPT's generate does it: a key/value cache up
to block_size, then the model over the sliding window of the last block_size tokens. The tokens
come in chunks, one device call each, that carry the token buffer and the cache from one to the
next, so that the text can be printed as it is written; generating all tokens at once is the same
program in one chunk. A row is done once it has generated one of the stop strings, which the
device looks for in the row's bytes, and the generation ends when every row is done.

    tokens = generate(params, config, idx, key, max_new_tokens, temperature, top_k)  # nanoGPT's generate
    prompt, length = prompt_buffer(ids, config.block_size)  # any prompt, in a buffer of one shape
    stops = stop_tables(pieces, [b'\\n\\n'])  # pieces[i]: the bytes of token i
    for tokens, step, done in generate_stream(params, config, prompt[None], length, key, 100, stops=stops, chunk=8):
        ...  # the row so far: tokens[0, :length + step]
"""

from functools import partial
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jax_transformer import GPT

NO_BYTE = -1  # in a row of bytes: nothing there (before the first byte, after the last)
ANY_BYTE = -2  # in a stop string's row, before its first byte: whatever is there matches


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


# -----------------------------------------------------------------------------
# stop strings, compared byte by byte: BPE can write a string with many different tokens

def stop_tables(pieces, stops):
    """What the device compares: the bytes of every token, (V, M), from pieces (the bytes of token
    i is pieces[i]), NO_BYTE after their end; and the stop strings (bytes), (S, W), right-aligned
    in rows as long as the longest, ANY_BYTE before their start."""
    token_bytes = np.full((len(pieces), max(map(len, pieces))), NO_BYTE, np.int16)
    for i, piece in enumerate(pieces):
        token_bytes[i, :len(piece)] = np.frombuffer(piece, np.uint8)
    width = max(map(len, stops))
    stop_bytes = np.full((len(stops), width), ANY_BYTE, np.int16)
    for i, stop in enumerate(stops):
        stop_bytes[i, width - len(stop):] = np.frombuffer(stop, np.uint8)
    return jnp.asarray(token_bytes), jnp.asarray(stop_bytes)


def find_stops(recent, new, stop_bytes):
    """(stopped, recent): whether a stop string of stop_bytes (S, W) ends in a row's new bytes (B, M)
    (NO_BYTE after their end), which follow the row's last W bytes `recent` (B, W); and the last W
    bytes after the new ones. A stop string can end anywhere in a token, and begin tokens earlier."""
    W, M = recent.shape[1], new.shape[1]
    n_new = jnp.sum(new != NO_BYTE, axis=1)  # (B,)
    text = jnp.concatenate([recent, new], axis=1)  # (B, W + M)
    ending_at = text[:, np.arange(M)[:, None] + np.arange(1, W + 1)]  # (B, M, W): the W bytes up to each new one
    matches = (ending_at[:, :, None, :] == stop_bytes) | (stop_bytes == ANY_BYTE)  # (B, M, S, W)
    ends = jnp.all(matches, axis=-1).any(axis=-1) & (jnp.arange(M) < n_new[:, None])  # (B, M)
    return ends.any(axis=1), jnp.take_along_axis(text, n_new[:, None] + jnp.arange(W), axis=1)


def printable_end(text, stops, begin, finished):
    """(end, ended) for the bytes of a sample so far, text, generated from byte `begin` on (the
    prompt before): text[:end] is final. A sample ends before the first stop string it generates,
    or at its last token (finished); until then, bytes that may begin a stop string are held back."""
    found = [i for i in (text.find(stop, begin) for stop in stops) if i >= 0]
    if found:
        return min(found), True
    if finished:
        return len(text), True
    partial_stop = [k for stop in stops for k in range(1, len(stop))
                    if len(text) - k >= begin and text.endswith(stop[:k])]
    return len(text) - max(partial_stop, default=0), False


# -----------------------------------------------------------------------------
# generation, a chunk of tokens per device call

class Generation(NamedTuple):
    """What a generation carries from one device call to the next."""
    tokens: jax.Array  # (B, P + max_new_tokens): the prompt buffer, then the new tokens from position `length`
    cache: dict  # the key/value cache of the positions before length + step - 1
    length: jax.Array  # (): the prompt's length
    step: jax.Array  # (): how many tokens have been generated
    done: jax.Array  # (B,): the rows that generated a stop string
    recent: jax.Array  # (B, W): each row's last W generated bytes, NO_BYTE before the first (W: the longest stop)


def prompt_buffer(ids, size):
    """The last `size` tokens of ids (..., T) at most (all the model sees, as nanoGPT crops them),
    right-padded to size, and how many they are: one shape for prompts of any length."""
    ids = np.asarray(ids, np.int32)[..., -size:]
    return np.pad(ids, [(0, 0)] * (ids.ndim - 1) + [(0, size - ids.shape[-1])]), ids.shape[-1]


@partial(jax.jit, static_argnames=('config', 'max_new_tokens', 'stop_width'))
def start_generation(params, config, prompt, length, max_new_tokens, stop_width=0):
    """The Generation of max_new_tokens tokens after the first `length` tokens of each row of prompt
    (B, P), P <= block_size, the rest padding. The cache is prefilled up to the last prompt token,
    which the first step runs, so that a traced `length` needs no logits from the middle of the
    prompt; causal attention keeps the padding from the prompt, and the steps overwrite its keys
    and values."""
    B = prompt.shape[0]
    _, variables = GPT(config).apply({'params': params, 'cache': init_cache(config, B)}, prompt, decode=True,
                                     mutable=['cache'])
    length = jnp.asarray(length, jnp.int32)
    tokens = jnp.concatenate([prompt.astype(jnp.int32), jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    # done and recent are computed from the prompt's rows, as generate_chunk computes them from the tokens, so
    # that XLA splits them over the devices as it splits the rows there: every chunk then runs one program
    done = prompt[:, 0] < 0  # (B,) False
    recent = jnp.where(done[:, None], 0, jnp.full((B, stop_width), NO_BYTE, jnp.int16))  # (B, W) NO_BYTE
    return Generation(tokens, dict(variables['cache'], index=length - 1), length, jnp.array(0, jnp.int32), done,
                      recent)


@partial(jax.jit, static_argnames=('config', 'top_k', 'top_p'), donate_argnames='state')
def generate_chunk(params, config, state, keys, until, temperature=1.0, top_k=None, top_p=1.0, stops=None):
    """state, the Generation, with its tokens generated up to step `until` (token i drawn with
    keys[i]), or fewer once every row is done (with `stops` from stop_tables). `until` is traced:
    chunks of any size, and all tokens at once, run one compiled program."""
    model = GPT(config)
    block = config.block_size

    def add_token(state, logits):  # draws the token at position length + step from logits (B, 1, V)
        token = sample_token(logits, keys[state.step], temperature, top_k, top_p)  # (B,)
        tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.length + state.step, axis=1)
        done, recent = state.done, state.recent
        if stops is not None:
            stopped, recent = find_stops(recent, stops[0][token], stops[1])
            done = done | stopped
        return state._replace(tokens=tokens, step=state.step + 1, done=done, recent=recent)

    def cached_step(state):  # runs the previous token on the cache
        token = jax.lax.dynamic_slice_in_dim(state.tokens, state.length + state.step - 1, 1, axis=1)  # (B, 1)
        (logits, _), variables = model.apply({'params': params, 'cache': state.cache}, token, decode=True,
                                             mutable=['cache'])
        return add_token(state._replace(cache=variables['cache']), logits)

    def window_step(state):  # the cache is full: the model over the last block_size tokens
        window = jax.lax.dynamic_slice_in_dim(state.tokens, state.length + state.step - block, block, axis=1)
        return add_token(state, model.apply({'params': params}, window)[0])

    def running(state):
        return (state.step < until) & ~jnp.all(state.done)

    state = jax.lax.while_loop(lambda s: running(s) & (s.length + s.step <= block), cached_step, state)
    if state.tokens.shape[1] - 1 > block:  # traced only when a sequence can outgrow block_size
        state = jax.lax.while_loop(running, window_step, state)
    return state


def stop_width(stops):
    """The bytes a row keeps of what it generated, to find the stop strings (from stop_tables) in them."""
    return 0 if stops is None else stops[1].shape[1]


def compiled_generation(params, config, prompt, length, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0,
                        stops=None):
    """The two programs generate_stream runs with these arguments, compiled (the one that starts
    the generation, the one that continues it): what they need is known before either runs, and
    generate_stream finds them compiled."""
    start = start_generation.lower(params, config, prompt, length, max_new_tokens, stop_width(stops)).compile()
    keys = jax.random.split(jax.random.key(0), max_new_tokens)
    chunk = generate_chunk.lower(params, config, start.out_info, keys, max_new_tokens, temperature, top_k, top_p,
                                 stops).compile()
    return start, chunk


def generate_stream(params, config, prompt, length, key, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0,
                    stops=None, chunk=None):
    """Generate max_new_tokens tokens after the first `length` tokens of each row of prompt (B, P)
    (prompt_buffer), in device calls of `chunk` tokens (None: one call), until every row is done
    (`stops` from stop_tables; None: no stop). After each call, yield the host's copy of the tokens
    (B, P + max_new_tokens), how many tokens were generated (a row so far is tokens[b, :length +
    step]) and the rows done (B,). The tokens do not depend on the chunks: token i is drawn with
    the i-th key of jax.random.split(key, max_new_tokens), as in one call."""
    state = start_generation(params, config, prompt, length, max_new_tokens, stop_width(stops))
    keys = jax.random.split(key, max_new_tokens)
    step, done = 0, np.zeros(len(prompt), bool)
    while step < max_new_tokens and not done.all():
        until = max_new_tokens if chunk is None else min(step + chunk, max_new_tokens)
        state = generate_chunk(params, config, state, keys, until, temperature, top_k, top_p, stops)
        tokens, step, done = jax.device_get((state.tokens, state.step, state.done))
        step = int(step)  # a Python int, as `until` was at the first call: the same program
        yield tokens, step, done


def generate(params, config, idx, key, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0):
    """Complete the sequences idx (B, T) with max_new_tokens sampled tokens, like nanoGPT's
    generate: once a sequence is longer than block_size it is conditioned on its last block_size
    tokens. Up to block_size the key/value cache makes each new token cost one position; after
    that each token runs the model over the sliding window. One device call; the tokens (B, T +
    max_new_tokens) as a NumPy array."""
    idx = np.asarray(idx)
    prompt, length = prompt_buffer(idx, min(idx.shape[1], config.block_size))
    *_, (tokens, _, _) = generate_stream(params, config, prompt, length, key, max_new_tokens, temperature, top_k, top_p)
    return np.concatenate([idx[:, :idx.shape[1] - length], tokens], axis=1)
