"""
HellaSwag (https://github.com/rowanz/hellaswag), scored as build-nanogpt's hellaswag.py scores
it, in completion style. An example is a context and 4 endings, one of them right (its label).
Each ending is scored by the model's cross-entropy over its tokens, given the tokens before
them: acc counts the examples whose right ending has the lowest summed loss, acc_norm those whose
right ending has the lowest loss per token. build-nanogpt's figures for GPT-2 124M over the
10,042 validation examples: acc 0.2859, acc_norm 0.2955.

Every row, a context followed by one ending, is scored at one fixed length, so the model is
compiled once: rows are left-aligned and padded at the end. Attention is causal, so the padding
cannot change what comes before it, and it is masked out of the losses. A row longer than the
length keeps its last tokens.

checks.read_hellaswag reads the examples from HellaSwag's jsonl files, before JAX is imported.
"""

from functools import cache, partial

import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from jax_transformer import GPT

N_ENDINGS = 4  # endings per example, as checks.read_hellaswag makes sure


def render(example, enc):
    """The 4 rows of an example as build-nanogpt renders them, each (tokens, mask): the context's
    tokens then one ending's, encoded with the space that separates it from the context, and a
    mask that is 1 on the ending's tokens."""
    context = enc.encode(example['ctx'])
    rows = []
    for ending in example['endings']:
        ending_tokens = enc.encode(' ' + ending)
        rows.append((context + ending_tokens, [0] * len(context) + [1] * len(ending_tokens)))
    return rows


def pack(rendered, length):
    """tokens and mask, (n, 4, length) int32 arrays, of n rendered examples: each row left-aligned
    and padded with zeros, or if longer than length, its last length tokens."""
    tokens = np.zeros((len(rendered), N_ENDINGS, length), np.int32)
    mask = np.zeros_like(tokens)
    for i, rows in enumerate(rendered):
        for j, (row, row_mask) in enumerate(rows):
            row, row_mask = row[-length:], row_mask[-length:]
            tokens[i, j, :len(row)] = row
            mask[i, j, :len(row)] = row_mask
    return tokens, mask


def row_losses(params, tokens, mask, config):
    """For each row of tokens (rows, T): the summed cross-entropy, in float32, of the tokens where
    mask is 1, each predicted from the tokens before it, and the number of those tokens."""
    logits, _ = GPT(config).apply({'params': params}, tokens, tokens)  # with targets: logits at every position
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    scored = mask[:, 1:]
    return jnp.sum(nll * scored, axis=1), jnp.sum(scored, axis=1)


def process_rows(examples, enc, block_size, length=None):
    """This process's share of the examples, rendered and packed once for every evaluate call:
    process p takes examples p, p + process_count, p + 2 * process_count, ... length is the rows'
    fixed length; by default the longest row rounded up to a multiple of 64, at most block_size.
    A dict of tokens and mask (n, 4, length), labels (n,), and count, the examples of all processes."""
    rendered = [render(example, enc) for example in examples]
    if length is None:
        longest = max(len(tokens) for rows in rendered for tokens, _ in rows)
        length = min(block_size, -(-longest // 64) * 64)
    mine = slice(jax.process_index(), None, jax.process_count())
    tokens, mask = pack(rendered[mine], length)
    labels = np.array([example['label'] for example in examples[mine]])
    return {'tokens': tokens, 'mask': mask, 'labels': labels, 'count': len(examples)}


@cache
def scorer(config, mesh):
    """row_losses compiled for the model config, its rows split over mesh: one program for every
    evaluation of a run."""
    rows = NamedSharding(mesh, P('data'))
    return jax.jit(partial(row_losses, config=config), out_shardings=(rows, rows))


def evaluate(params, config, rows, mesh, batch_size, stopped=lambda: 0):
    """Score the examples of rows (process_rows) with the model (config, its params replicated over
    mesh, a 1-D mesh 'data'), batch_size examples a step (rounded up to a multiple of the device
    count), split over the devices. Returns the summed and the mean loss of every ending of this
    process's examples, (n, 4) each (every example's with one process), and over all processes acc,
    acc_norm and count; None when stopped() says so after a step (every process asks it)."""
    tokens, mask, labels = rows['tokens'], rows['mask'], rows['labels']
    length = tokens.shape[-1]
    # every process takes the same number of steps of per_step examples, padded with empty ones
    per_step = -(-batch_size // jax.device_count()) * jax.local_device_count()
    n_steps = -(-rows['count'] // (per_step * jax.process_count()))
    padding = ((0, n_steps * per_step - len(labels)), (0, 0), (0, 0))
    tokens, mask = np.pad(tokens, padding), np.pad(mask, padding)

    score = scorer(config, mesh)
    sums, counts = [], []
    for step in tqdm(range(n_steps), desc='hellaswag', disable=jax.process_index() != 0, delay=3, leave=False):
        batch = slice(step * per_step, (step + 1) * per_step)
        x, m = multihost_utils.host_local_array_to_global_array(
            (tokens[batch].reshape(-1, length), mask[batch].reshape(-1, length)), mesh, P('data'))
        s, c = multihost_utils.global_array_to_host_local_array(score(params, x, m), mesh, P('data'))
        sums.append(np.asarray(s))
        counts.append(np.asarray(c))
        if stopped():
            return None
    sum_loss = np.concatenate(sums).reshape(-1, N_ENDINGS)[:len(labels)]
    mean_loss = sum_loss / np.concatenate(counts).reshape(-1, N_ENDINGS)[:len(labels)]

    mine_right = [np.sum(sum_loss.argmin(axis=1) == labels), np.sum(mean_loss.argmin(axis=1) == labels), len(labels)]
    right, right_norm, count = multihost_utils.process_allgather(np.array(mine_right)).reshape(-1, 3).sum(axis=0)
    return {'sum_loss': sum_loss, 'mean_loss': mean_loss, 'acc': float(right / count),
            'acc_norm': float(right_norm / count), 'count': int(count)}
