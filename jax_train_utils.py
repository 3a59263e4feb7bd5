"""
Training pieces for train_jax.py: devices and mesh, the batch loader, the optimizer and its
learning rate schedule, the jitted train and eval steps, and checkpoints.
"""

import atexit
import collections
import concurrent.futures
import contextlib
import csv
import functools
import gc
import importlib.util
import itertools
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_transformer import (GPT, GPTConfig, NANOGPT_MODEL_ARGS, param_shapes, param_paths, hf_name,
                             nanogpt_param_names, params_from_nanogpt)

# -----------------------------------------------------------------------------
# devices

# Dense bfloat16 peak FLOP/s of one device, matched against jax's device_kind (lower case).
# CPU: what XLA reaches on large float32 matrix products, per core (a 2-core AVX-512 machine
# measured ~200 GFLOP/s on 2048^3); pass --peak_flops for your machine.
PEAK_FLOPS = [
    ('h200', 989e12), ('h100 pcie', 756e12), ('h100', 989e12), ('gh200', 989e12),
    ('a100', 312e12), ('a10g', 70e12), ('l40s', 362e12), ('l4', 121e12),
    ('rtx 4090', 165e12), ('rtx 3090', 71e12), ('v100', 125e12), ('t4', 65e12),
    ('tpu v6', 918e12), ('tpu v5p', 459e12), ('tpu v5 lite', 197e12), ('tpu v5e', 197e12),
    ('tpu v4', 275e12), ('tpu v3', 123e12), ('tpu v2', 45e12),
]
CPU_PEAK_FLOPS_PER_CORE = 100e9


def device_peak_flops(device):
    """Peak FLOP/s of one jax device, from PEAK_FLOPS; None when the device is unknown."""
    if device.platform == 'cpu':
        return CPU_PEAK_FLOPS_PER_CORE * (os.cpu_count() or 1) / jax.local_device_count()
    kind = device.device_kind.lower()
    return next((flops for name, flops in PEAK_FLOPS if name in kind), None)


def configure_devices(device, cpu_devices, batches):
    """Call before anything touches a device. device 'cpu' forces the CPU; any other value
    ('cuda', 'tpu', ...) leaves JAX its default backend: the GPUs/TPUs when present, else the CPU.
    On CPU the cores become cpu_devices JAX devices sharing the batch, which is faster than one
    device on all cores; 0 picks the most devices, up to one per core, over which every
    (n_batches, batch_size) of batches splits (see batch_layout). A count set in XLA_FLAGS wins."""
    if device == 'cpu':
        jax.config.update('jax_platforms', 'cpu')
    if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
        if cpu_devices == 0:
            cpu_devices = max(n for n in range(1, (os.cpu_count() or 1) + 1)
                              if all(n_batches % n == 0 or batch_size % n == 0 for n_batches, batch_size in batches))
        jax.config.update('jax_num_cpu_devices', cpu_devices)
        if cpu_devices > 1:  # a core per device: threading each device's matrix products only adds contention
            os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false'


def use_compilation_cache(cache_dir):
    """Keep what XLA compiles in cache_dir, so that the next run with the same shapes (a resume,
    another run of the config, sampling again) loads its programs instead of compiling them; the
    least recently used go when it holds more than 2 GiB. '' turns it off; a
    JAX_COMPILATION_CACHE_DIR set in the environment wins."""
    if cache_dir and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
        jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
        jax.config.update('jax_compilation_cache_max_size', 2 ** 31)


def make_mesh():
    """A 1-D mesh named 'data' over every device of every process. Auto axes let XLA propagate
    shardings (an embedding gather on a batch-sharded input needs no annotations)."""
    return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def batch_layout(n_batches, batch_size, n_devices, name='gradient_accumulation_steps'):
    """How n_batches batches of batch_size rows run on n_devices data parallel devices, as
    (steps, rows per step): whole batches per device when n_devices divides n_batches (nanoGPT's
    DDP divides gradient_accumulation_steps by its world size), else each batch split over the
    devices. The rows, and so the mean loss and gradient, are the same for any n_devices.
    ValueError, saying what would work, when neither divides; name is n_batches' config key."""
    if n_batches % n_devices == 0:
        return n_batches // n_devices, batch_size * n_devices
    if batch_size % n_devices == 0:
        return n_batches, batch_size
    round_up = lambda n: -(-n // n_devices) * n_devices
    raise ValueError(f"{name}={n_batches} and batch_size={batch_size} cannot be split over {n_devices} devices: "
                     f"make one of them a multiple of {n_devices} (e.g. --{name}={round_up(n_batches)} "
                     f"or --batch_size={round_up(batch_size)})")


def resolve_dtype(dtype):
    """The compute dtype name: 'auto' is bfloat16 on GPU/TPU and float32 on CPU."""
    if dtype == 'auto':
        return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
    if dtype == 'float16':
        raise ValueError("dtype 'float16' needs loss scaling, which this port does not do: "
                         "use --dtype=bfloat16 (GPU/TPU) or --dtype=float32")
    if dtype not in ('float32', 'bfloat16'):
        raise ValueError(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'auto'")
    return dtype


# -----------------------------------------------------------------------------
# data

def batch_starts(data_path, seed, iter_num, stream, layout, block_size):
    """Where the random windows of one iteration's batches start in the token file, shape layout
    (steps, rows). A pure function of (seed, iteration, stream) and the number of rows, whatever
    the devices and processes, so resume is exact and results do not depend on the topology;
    stream 0 is training, 1 and 2 are the train and val evaluation batches."""
    n_tokens = os.path.getsize(data_path) // 2
    rng = np.random.default_rng([seed, iter_num, stream])
    return rng.integers(0, n_tokens - block_size, size=math.prod(layout)).reshape(layout)


def get_batch(mesh, data_path, starts, block_size):
    """The windows of the uint16 token file at starts (steps, rows): inputs x and next tokens y,
    global int32 arrays (steps, rows, T) split along the rows over the mesh's 'data' axis. Each
    process reads the rows of its own devices only. The memmap is re-opened on every call, as in
    nanoGPT, to keep its pages from piling up."""
    data = np.memmap(data_path, dtype=np.uint16, mode='r')
    shape = starts.shape + (block_size,)
    sharding = NamedSharding(mesh, P(None, 'data'))
    xs, ys = [], []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        rows = starts[index[:2]]
        windows = np.stack([data[i:i + block_size + 1] for i in rows.ravel()]).astype(np.int32)
        windows = windows.reshape(rows.shape + (block_size + 1,))
        xs.append(jax.device_put(windows[..., :-1], device))
        ys.append(jax.device_put(windows[..., 1:], device))
    return (jax.make_array_from_single_device_arrays(shape, sharding, xs),
            jax.make_array_from_single_device_arrays(shape, sharding, ys))


def prefetch(make_batch, first):
    """Yields make_batch(first), make_batch(first + 1), ..., each made on a background thread two
    iterations ahead, so that reading and moving batches stays off the training step's path."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    ahead = collections.deque(pool.submit(make_batch, i) for i in (first, first + 1))
    for i in itertools.count(first + 2):
        yield ahead.popleft().result()
        ahead.append(pool.submit(make_batch, i))


# -----------------------------------------------------------------------------
# optimizer

def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's schedule: linear warmup, cosine decay down to min_lr, then min_lr.
    Works on jax arrays (the optimizer's traced step count) and, with NumPy on the host, on
    Python numbers, so that logging the rate costs no device work."""
    xp = jnp if isinstance(it, jax.Array) else np
    warmup = learning_rate * (it + 1) / (warmup_iters + 1)
    decay_ratio = (it - warmup_iters) / max(lr_decay_iters - warmup_iters, 1)
    coeff = 0.5 * (1.0 + xp.cos(math.pi * xp.clip(decay_ratio, 0.0, 1.0)))
    cosine = min_lr + coeff * (learning_rate - min_lr)
    return xp.where(it < warmup_iters, warmup, xp.where(it > lr_decay_iters, min_lr, cosine))


def decay_mask(params):
    """Weight decay on every parameter of 2 or more dims (matmul weights, embeddings),
    none on biases and LayerNorm parameters."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


class AdamWState(NamedTuple):
    count: jax.Array  # updates done so far, which the learning rate schedule reads
    mu: dict  # first moments, shaped like the params
    nu: dict  # second moments


def adamw(learning_rate, weight_decay, beta1, beta2, grad_clip, mask, eps=1e-8):
    """torch.optim.AdamW after clip_grad_norm_, as nanoGPT steps: the gradients scaled to a global
    norm of at most grad_clip (0 disables it), Adam's bias-corrected moments, and decoupled weight
    decay on the parameters where mask is True. learning_rate is a number or a function of the
    count. Written out rather than chained from optax's pieces so that each parameter is updated
    in one pass: on the CPU config that is ~2 ms (5%) faster per step (bench_jax.py)."""
    def init(params):
        return AdamWState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params),
                          nu=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = state.count + 1
        clip = jnp.minimum(1.0, grad_clip / optax.tree.norm(grads)) if grad_clip > 0.0 else 1.0
        bias1, bias2 = 1 - beta1 ** count, 1 - beta2 ** count

        def one(g, mu, nu, p, decay):
            g = g * clip
            mu = beta1 * mu + (1 - beta1) * g
            nu = beta2 * nu + (1 - beta2) * g * g
            step = (mu / bias1) / (jnp.sqrt(nu / bias2) + eps) + (weight_decay * p if decay else 0.0)
            return -lr * step, mu, nu
        out = jax.tree.map(one, grads, state.mu, state.nu, params, mask)
        updates, mu, nu = (jax.tree.map(lambda o: o[i], out, is_leaf=lambda o: isinstance(o, tuple)) for i in range(3))
        return updates, AdamWState(count, mu, nu)
    return optax.GradientTransformation(init, update)


def nanogpt_param_groups(config):
    """The names of the parameters in the two groups of nanoGPT's AdamW (its configure_optimizers):
    those decayed (2 or more dims), then the others, each in named_parameters() order."""
    ndim = {hf_name(path): len(shape.shape) for path, shape in param_paths(param_shapes(config))}
    names = nanogpt_param_names(config)
    return [n for n in names if ndim[n] >= 2], [n for n in names if ndim[n] < 2]


def adamw_state_from_nanogpt(optimizer, config):
    """The AdamWState of nanoGPT's torch AdamW, from its state_dict() with NumPy arrays: the
    parameter ids of its two groups (nanogpt_param_groups) name each one's exp_avg, exp_avg_sq and
    step. torch's step becomes the count, which the learning rate schedule reads, so the next
    update is the one torch would make. ValueError when it is not such an optimizer."""
    decay, no_decay = nanogpt_param_groups(config)
    not_nanogpts = f"its optimizer is not nanoGPT's AdamW over {len(decay)} decayed and {len(no_decay)} other tensors"
    try:
        ids = [list(group['params']) for group in optimizer['param_groups']]
        if [len(g) for g in ids] != [len(decay), len(no_decay)]:
            raise ValueError(f"{not_nanogpts}: its groups hold {' and '.join(str(len(g)) for g in ids)}")
        state = dict(zip(decay + no_decay, (optimizer['state'][i] for i in ids[0] + ids[1])))
        steps = {float(s['step']) for s in state.values()}
        mu, nu = ({name: s[k] for name, s in state.items()} for k in ('exp_avg', 'exp_avg_sq'))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{not_nanogpts} ({type(e).__name__}: {e})") from None
    if len(steps) != 1:
        raise ValueError(f"its optimizer stepped its parameters {min(steps):.0f} to {max(steps):.0f} times")
    try:
        mu, nu = params_from_nanogpt(mu, config), params_from_nanogpt(nu, config)
    except ValueError as e:
        raise ValueError(f"its optimizer's moments are not the model's: {e}") from None
    return AdamWState(count=jnp.asarray(steps.pop(), jnp.int32), mu=mu, nu=nu)


def configure_optimizer(params, learning_rate, weight_decay, beta1, beta2, grad_clip,
                        decay_lr, warmup_iters, lr_decay_iters, min_lr):
    """AdamW with nanoGPT's weight decay mask and schedule, after global-norm clipping
    (grad_clip 0 disables it). The schedule reads the optimizer's own step count, so it
    resumes with the optimizer state."""
    mask = decay_mask(params)
    sizes = [(p.size, m) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))]
    for decayed, name in ((True, 'decayed'), (False, 'non-decayed')):
        n = [s for s, m in sizes if m == decayed]
        print(f"num {name} parameter tensors: {len(n)}, with {sum(n):,} parameters")
    if decay_lr:
        schedule = lambda count: get_lr(count, learning_rate, warmup_iters, lr_decay_iters, min_lr)
    else:
        schedule = learning_rate
    return adamw(schedule, weight_decay, beta1, beta2, grad_clip, mask)


@functools.lru_cache
def model_apply(config):
    """GPT(config).apply, the same object for equal configs so that jitted steps taking a train
    state (apply_fn is a static field) compile once per config, not once per state."""
    return GPT(config).apply


def create_train_state(config, params, tx):
    return train_state.TrainState.create(apply_fn=model_apply(config), params=params, tx=tx)


# -----------------------------------------------------------------------------
# steps

def loss_fn(params, apply_fn, x, y, dropout_key):
    deterministic = dropout_key is None
    rngs = None if deterministic else {'dropout': dropout_key}
    _, loss = apply_fn({'params': params}, x, y, deterministic=deterministic, rngs=rngs)
    return loss


@jax.jit
def eval_loss(state, x, y):
    """Mean loss over batches x, y (n, B, T), dropout off."""
    losses = jax.lax.map(lambda b: loss_fn(state.params, state.apply_fn, b[0], b[1], None), (x, y))
    return jnp.mean(losses)


def mean_grads(params, apply_fn, x, y, dropout_key):
    """The mean gradient and loss over the micro-batches x, y (GA, B, T), nanoGPT's loss /
    gradient_accumulation_steps: a scan over the micro-steps, each with its own dropout key."""
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(grads, inputs):
        i, xb, yb = inputs
        key = jax.random.fold_in(dropout_key, i)
        loss, g = grad_fn(params, apply_fn, xb, yb, key)
        return jax.tree.map(jnp.add, grads, g), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, losses = jax.lax.scan(micro_step, zeros, (jnp.arange(x.shape[0]), x, y))
    return jax.tree.map(lambda g: g / x.shape[0], grads), jnp.mean(losses)


def flat_all_reduce_grads(mesh, params, apply_fn, x, y, dropout_key):
    """mean_grads, each device of the mesh on its own rows of x, y (replicated params), then
    averaged over the devices in one all-reduce of a flat vector, as nanoGPT's DDP averages its
    ranks' gradients (equal to mean_grads on all rows unless targets hold -1). XLA's CPU all-reduce
    costs ~55 us per array: 2.9 ms for the CPU config's 52 parameters, 0.3 ms as one vector."""
    def per_device(params, x, y):
        key = jax.random.fold_in(dropout_key, jax.lax.axis_index('data'))  # each device its own masks
        grads, loss = mean_grads(params, apply_fn, x, y, key)
        flat, unflatten = ravel_pytree(grads)
        flat, loss = jax.lax.pmean((flat, loss), 'data')
        return unflatten(flat), loss
    # check_vma off: each device's gradients stay its own until the pmean, with no all-reduce per parameter
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(None, 'data'), P(None, 'data')),
                         out_specs=(P(), P()), check_vma=False)(params, x, y)


def _train_step(state, x, y, dropout_key, mesh=None):
    """One optimizer step over the micro-batches x, y (GA, B, T): the mean gradient (mean_grads, or
    flat_all_reduce_grads over mesh), clipped and applied by the optimizer. Returns the new state
    and the mean loss."""
    dropout_key = jax.random.fold_in(dropout_key, state.step)
    if mesh is None:
        grads, loss = mean_grads(state.params, state.apply_fn, x, y, dropout_key)
    else:
        grads, loss = flat_all_reduce_grads(mesh, state.params, state.apply_fn, x, y, dropout_key)
    return state.apply_gradients(grads=grads), loss


def make_train_step(state_sharding=None, mesh=None, fsdp=False):
    """The jitted train step. It donates the train state and returns the new one placed by
    state_sharding (a tree of shardings shaped like the state, see state_sharding; None lets XLA
    choose, which keeps a replicated state replicated). Given the mesh, on CPU devices and without
    fsdp, the gradients are averaged in one flat all-reduce (flat_all_reduce_grads); elsewhere XLA
    places its own all-reduces, which GPUs and TPUs overlap with the backward pass."""
    flat = mesh is not None and not fsdp and jax.default_backend() == 'cpu'
    step = functools.partial(_train_step, mesh=mesh if flat else None)
    return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, None))


train_step = make_train_step()


# -----------------------------------------------------------------------------
# sharding of the train state

def state_sharding(mesh, abstract_state, fsdp, fsdp_min_size):
    """A sharding for each array of the train state (or of any tree of shapes): replicated on every
    device, or with fsdp split along the largest dimension that the 'data' axis divides, so that
    each device holds 1/n of the params and optimizer state and XLA gathers each layer's weights
    when it needs them. Arrays under fsdp_min_size elements, or with no such dimension, stay
    replicated: splitting them saves little memory and costs a collective each."""
    n = mesh.shape['data']

    def place(x):
        shape = np.shape(x)
        dims = [d for d in range(len(shape)) if shape[d] % n == 0]
        if not fsdp or math.prod(shape) < fsdp_min_size or not dims:
            return NamedSharding(mesh, P())
        split = max(dims, key=lambda d: shape[d])
        return NamedSharding(mesh, P(*('data' if d == split else None for d in range(len(shape)))))
    return jax.tree.map(place, abstract_state)


def bytes_per_device(abstract_state, sharding):
    """The bytes one device holds of the arrays of abstract_state placed by sharding (a tree of
    shardings shaped like it)."""
    return sum(math.prod(s.shard_shape(np.shape(x))) * np.result_type(x).itemsize
               for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(sharding)))


# -----------------------------------------------------------------------------
# checkpoints

def checkpoint_manager(out_dir, read_only=False):
    """An orbax CheckpointManager keeping the latest checkpoint of out_dir. Each save is written
    to a temporary folder and renamed when complete, and the previous one is deleted only then,
    so out_dir always holds a restorable checkpoint, even after a kill -9 during a save; the
    temporary folder such a kill leaves is deleted when the next training run opens out_dir, which
    it holds the lock of (see lock_out_dir). read_only (sampling, export, eval_only) creates and
    deletes nothing, so it leaves a save in progress alone."""
    # orbax's own clean-up runs in a thread that an early exit (a bad flag) would cut off mid-way
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only, cleanup_tmp_directories=False)
    if not read_only:
        for unfinished in pathlib.Path(out_dir).glob('*.orbax-checkpoint-tmp*'):
            shutil.rmtree(unfinished, ignore_errors=True)
    return ocp.CheckpointManager(os.path.abspath(out_dir), options=options)


def error_reason(e):
    """What went wrong, in a few words: the system's message for an OSError, also where tensorstore
    reports one inside its own message (os_error_code), else the first sentence of e's message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
        return os.strerror(int(code[1]))
    return (str(e).strip().splitlines() or [''])[0].split('. ')[0][:200].rstrip(':.')


@contextlib.contextmanager
def quiet_unless_failed():
    """Silence orbax while the block runs: when a read or write fails, each of its threads still in
    flight prints a traceback, through absl's logger, threading.excepthook, the asyncio logger and,
    as orbax's event loops close, sys.excepthook and at exit sys.unraisablehook. They sound again
    only when the block succeeds: after a failure the program ends with its own one-line error."""
    hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
    sys.excepthook = sys.unraisablehook = threading.excepthook = lambda *args: None
    loggers = [logging.getLogger(name) for name in ('absl', 'asyncio')]
    for logger in loggers:
        logger.disabled = True
    yield
    sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
    for logger in loggers:
        logger.disabled = False


def save_checkpoint(manager, state, meta):
    """Save params, optimizer state and the JSON metadata (model_args, iter_num, best_val_loss,
    config) as separate items, so sampling can read the params alone, and wait until the write is
    complete. A run replacing the checkpoint another run left in out_dir may save at a lower or the
    same iter_num: force saves below the latest step, and orbax deletes the old checkpoint once the
    new one is complete; one at the very same iter_num must be deleted first, as orbax never writes
    over a step.
    OSError with the reason in a few words when the write fails (a full disk, lost permissions, an
    I/O error): the unfinished folder is removed where possible and manager.latest_step() is the
    checkpoint out_dir still holds. With several processes, a write that fails on one fails on all:
    the others wait for it at orbax's barrier, which fails too (at orbax's timeout at the latest)."""
    step = meta['iter_num']
    if step in manager.all_steps():
        manager.delete(step)
    try:
        with quiet_unless_failed():
            manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta)))
            manager.wait_until_finished()  # a failure shows now, not at the next save
            return
    except Exception as e:  # orbax and tensorstore wrap the system's error in many kinds
        reason = error_reason(e)
    if jax.process_index() == 0:
        remove_unfinished(manager.directory, step)
    manager.reload()  # orbax counted the failed step as saved
    free_abandoned_coroutines()
    raise OSError(reason)


def free_abandoned_coroutines():
    """Free the reads or writes orbax had not started when one of them failed. Left to the
    program's exit, they may print a warning about a coroutine never awaited after the error line."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        gc.collect()


def remove_unfinished(directory, step):
    """Remove the folder of the save of step that failed, where possible. The writes of tensorstore
    still in flight when it failed, which nothing waits for, may create files in it for a few
    milliseconds more: remove it until it has stayed gone for a second, for ten seconds at most."""
    start = removed = time.time()
    while time.time() - removed < 1 and time.time() - start < 10:
        for unfinished in directory.glob(f'{step}.orbax-checkpoint-tmp*'):
            shutil.rmtree(unfinished, ignore_errors=True)
            removed = time.time()
        time.sleep(0.01)


def restore_latest(manager, args):
    """manager.restore of the latest checkpoint; ValueError with a one-line message when it cannot
    be read into args: written for another model or optimizer, or damaged."""
    step = manager.latest_step()
    try:
        with quiet_unless_failed():
            return manager.restore(step, args=args)
    except Exception as e:  # orbax and tensorstore raise many kinds; the caller ends the program
        reason = f"{type(e).__name__}: {error_reason(e)}"
    free_abandoned_coroutines()
    raise ValueError(f"cannot restore the checkpoint {manager.directory}/{step} ({reason}): it was written for "
                     f"another model or optimizer, or is damaged; start again in another --out_dir")


def restore_meta(manager):
    """The metadata of the latest checkpoint, or None when there is none."""
    if manager.latest_step() is None:
        return None
    return restore_latest(manager, ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def required_meta(manager, out_dir):
    """restore_meta, for reading a run (sampling, export): ValueError when out_dir holds no checkpoint."""
    meta = restore_meta(manager)
    if meta is None:
        raise ValueError(f"no checkpoint in out_dir {out_dir!r}: train one with train_jax.py, or point --out_dir "
                         f"at one")
    return meta


def with_sharding(abstract, sharding):
    """abstract (a tree of shapes and dtypes) with each leaf placed by the matching leaf of sharding."""
    return jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), abstract, sharding)


def restore_model(out_dir, dtype, sharding):
    """(metadata, GPTConfig, params placed by sharding) of out_dir's newest checkpoint, this port's
    or nanoGPT's ckpt.pt, for sampling and export. ValueError when out_dir holds none."""
    manager = checkpoint_manager(out_dir, read_only=True)
    nanogpt_checkpoint = newest_nanogpt_checkpoint(manager)
    if nanogpt_checkpoint is not None:
        print(f"reading nanoGPT's checkpoint {nanogpt_checkpoint}")
        meta, params, _ = read_nanogpt_checkpoint(nanogpt_checkpoint, with_optimizer=False)
        return meta, GPTConfig(**meta['model_args'], dtype=dtype), jax.device_put(params, sharding)
    meta = required_meta(manager, out_dir)
    config = GPTConfig(**meta['model_args'], dtype=dtype)
    abstract_params = param_shapes(config)
    abstract_params = with_sharding(abstract_params, jax.tree.map(lambda _: sharding, abstract_params))
    args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    return meta, config, restore_latest(manager, args)['params']


def train_state_at(abstract_state, iter_num, params, opt_state, sharding):
    """A train state like abstract_state at step iter_num, holding params and opt_state, each array
    placed by sharding (see state_sharding), as the train step returns it."""
    state = abstract_state.replace(step=jnp.asarray(iter_num, jnp.int32), params=params, opt_state=opt_state)
    return jax.device_put(state, sharding)


def restore_train_state(manager, abstract_state, iter_num, sharding):
    """The latest checkpoint's params and optimizer state in a train state at step iter_num, each
    array placed by sharding (see state_sharding), whatever the sharding it was saved with."""
    abstract_state = with_sharding(abstract_state, sharding)
    args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_state.params),
                              opt_state=ocp.args.StandardRestore(abstract_state.opt_state))
    restored = restore_latest(manager, args)
    return train_state_at(abstract_state, iter_num, restored['params'], restored['opt_state'], sharding)


def restore_state_on_host(manager, out_dir):
    """(metadata, GPTConfig, train state) of the latest checkpoint of out_dir (opened by manager),
    on the first device, whatever the optimizer settings it was trained with (they shape no array):
    for export. ValueError when there is none."""
    meta = required_meta(manager, out_dir)
    config = GPTConfig(**meta['model_args'])
    abstract_params = param_shapes(config)
    tx = adamw(0.0, 0.0, 0.0, 0.0, 0.0, decay_mask(abstract_params))
    abstract_state = jax.eval_shape(functools.partial(create_train_state, config, tx=tx), abstract_params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding = jax.tree.map(lambda _: device, abstract_state)
    return meta, config, restore_train_state(manager, abstract_state, meta['iter_num'], sharding)


# -----------------------------------------------------------------------------
# nanoGPT's own checkpoint, ckpt.pt in its out_dir: read here, written by export_nanogpt.py.
# torch is imported on these paths only.

NANOGPT_CHECKPOINT = 'ckpt.pt'


def import_torch(why):
    """torch, or ValueError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"{why} needs PyTorch: pip install torch (the CPU wheel is enough: pip install torch "
                         f"--index-url https://download.pytorch.org/whl/cpu)") from None
    return torch


def checkpoint_time(manager):
    """When the latest checkpoint of manager was written, in nanoseconds (the modification time of
    its folder), or None when there is none."""
    step = manager.latest_step()
    return None if step is None else os.stat(os.path.join(manager.directory, str(step))).st_mtime_ns


def newest_nanogpt_checkpoint(manager):
    """The path of nanoGPT's ckpt.pt in the manager's out_dir when it is the newest checkpoint there
    (newer than this port's latest, or alone), else None: a run handed back and forth between
    nanoGPT and this port goes on from where it was trained last."""
    path = os.path.join(manager.directory, NANOGPT_CHECKPOINT)
    saved = checkpoint_time(manager)
    return path if os.path.isfile(path) and (saved is None or os.stat(path).st_mtime_ns > saved) else None


def read_nanogpt_checkpoint(path, with_optimizer=True):
    """nanoGPT's ckpt.pt, the dict its train.py saves, as (meta, params, opt_state): meta as this
    port's checkpoints hold it (model_args, iter_num, best_val_loss, config), the params of its
    model's state dict (a compiled model's, whose names begin with `_orig_mod.`, too) and the
    AdamWState of its optimizer (None without with_optimizer). nanoGPT's model computes the exact
    GELU. ValueError, with a one-line message, when torch is missing or the file is not such a
    checkpoint; nothing is written."""
    torch = import_torch(f"reading nanoGPT's checkpoint {path}")
    try:
        # mmap: each tensor is read when it is converted, so a large checkpoint is never all in memory
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # a damaged zip or pickle raises many kinds
        raise ValueError(f"cannot read {path} ({type(e).__name__}): it is cut short or damaged, or was not "
                         f"written by torch.save") from None
    not_nanogpts = f"{path} is not a checkpoint of nanoGPT's train.py"
    missing = [k for k in ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss')
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{not_nanogpts}: it has no {', '.join(missing)}")
    args = ckpt['model_args']
    sizes = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')
    if not (isinstance(args, dict) and all(k in args for k in NANOGPT_MODEL_ARGS)
            and all(isinstance(args[k], int) and args[k] > 0 for k in sizes)
            and args['n_embd'] % args['n_head'] == 0 and isinstance(args['bias'], bool)):
        raise ValueError(f"{not_nanogpts}: its model_args {args!r} are not those of a GPT")
    model_args = {**{k: args[k] for k in NANOGPT_MODEL_ARGS}, 'gelu_approximate': False}
    config = GPTConfig(**model_args)
    to_numpy = lambda tensors: {k: t.detach().to(torch.float32).numpy() for k, t in tensors.items()}
    try:
        meta = {'model_args': model_args, 'iter_num': int(ckpt['iter_num']),
                'best_val_loss': float(ckpt['best_val_loss']), 'config': dict(ckpt.get('config', {}))}
        model = {k.removeprefix('_orig_mod.'): t for k, t in to_numpy(ckpt['model']).items()}
        optimizer = ckpt['optimizer']
        if with_optimizer:
            optimizer = dict(optimizer, state={i: to_numpy(s) for i, s in optimizer['state'].items()})
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # not numbers and tensors where nanoGPT has them
        raise ValueError(f"{not_nanogpts} ({type(e).__name__}: {e})") from None
    try:
        params = params_from_nanogpt(model, config)
        opt_state = adamw_state_from_nanogpt(optimizer, config) if with_optimizer else None
    except ValueError as e:
        shape = ', '.join(f'{k}={args[k]}' for k in NANOGPT_MODEL_ARGS if k != 'dropout')
        raise ValueError(f"{path} does not fit its model_args ({shape}): {e}") from None
    return meta, params, opt_state


# -----------------------------------------------------------------------------
# loss curves: out_dir/metrics.csv, drawn by plot_jax.py

# one row per log line (loss: the iteration's mean training loss) and per evaluation (train_loss and
# val_loss over eval_iters batches); a column a row has no value for is left empty
METRICS_COLUMNS = ['iter', 'loss', 'train_loss', 'val_loss', 'lr', 'time_ms', 'mfu_percent']


def metrics_writer(out_dir, keep_before):
    """A function that appends one row to out_dir/metrics.csv, write(iter=..., loss=..., ...), numbers
    to 6 digits and None as an empty cell, and flushes it, so that a killed run keeps its rows. The
    file's rows at iterations before keep_before are kept and the later ones dropped: a run resumed
    at iteration keep_before writes those again, so its file ends as if the run had never stopped
    (0: a new file). That happens at the first row, so a run stopped before it (out of memory at
    the first evaluation, say) leaves the file as it was."""
    path = os.path.join(out_dir, 'metrics.csv')
    opened = []  # the file, open for appending from the first row on

    def start():
        rows = []
        if keep_before > 0 and os.path.exists(path):
            with open(path, newline='') as f:
                rows = [row for row in csv.DictReader(f) if int(row['iter']) < keep_before]
        with open(path + '.tmp', 'w', newline='') as f:  # replaced in one go: a kill cannot truncate it
            writer = csv.DictWriter(f, METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(path + '.tmp', path)
        return open(path, 'a', newline='')

    def write(**row):
        if not opened:
            opened.append(start())
        csv.DictWriter(opened[0], METRICS_COLUMNS).writerow(
            {k: f'{v:.6g}' if isinstance(v, float) else v for k, v in row.items()})
        opened[0].flush()
    return write


# -----------------------------------------------------------------------------
# one training run per out_dir

LOCK_FILE = 'train.lock'  # in out_dir: the host, pid and start time of the run that trains there
LEASE_REFRESH = 60  # seconds between two refreshes of the lock's modification time by its run
LEASE_EXPIRY = 600  # seconds without a refresh after which a lock is stale, wherever its run was


def read_lock(path):
    """The lock at path as {'host', 'pid', 'started', 'age'}, age the seconds since it was last
    refreshed; None when there is no lock, {'age'} alone while its run is still writing it."""
    try:
        with open(path) as f:
            text = f.read()
        age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return None
    try:
        return dict(json.loads(text), age=age)
    except ValueError:
        return {'age': age}


def process_running(pid):
    """Whether a process with this pid runs on this host, other than this one."""
    if pid == os.getpid():  # a lock naming this process was left by another process with the same pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def lock_is_stale(holder):
    """Whether the run of a lock (see read_lock) is gone: a dead pid on this host, or, wherever it
    ran (out_dir on a filesystem that several hosts share), a lease no longer refreshed."""
    if holder['age'] > LEASE_EXPIRY:
        return True
    return holder.get('host') == socket.gethostname() and 'pid' in holder and not process_running(holder['pid'])


def take_lock(out_dir):
    """Make this process the one training run of out_dir: create its lock file, or take over a stale
    one (see lock_is_stale), and refresh the lock's lease until the lock is released, at exit or by
    the returned function. ValueError naming the holder when another run has it."""
    path = os.path.join(out_dir, LOCK_FILE)
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic, on NFS too
            break
        except FileExistsError:
            holder = read_lock(path)
        if holder is None:  # released since
            continue
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
        if not lock_is_stale(holder):
            lease = "" if holder.get('host') == me['host'] else \
                f"; it refreshed its lock {holder['age']:.0f} s ago, which is taken over after {LEASE_EXPIRY} s without"
            raise ValueError(f"out_dir {out_dir!r} is in use by another run ({who}): wait for it to end or stop "
                             f"it, or choose another --out_dir{lease}")
        print(f"taking over the lock of {out_dir!r} from a run that is gone ({who})")
        # two runs taking over the same stale lock in the very same instant could both remove it
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
    stop = threading.Event()

    def refresh():
        while not stop.wait(LEASE_REFRESH):
            try:
                os.utime(path)
            except OSError:  # out_dir unreachable for now: the lease says so
                pass

    def release():
        stop.set()
        holder = read_lock(path)
        if holder is not None and all(holder.get(k) == v for k, v in me.items()):  # not taken over since
            os.remove(path)
    threading.Thread(target=refresh, daemon=True).start()
    atexit.register(release)
    return release


def lock_out_dir(out_dir):
    """take_lock on process 0, which writes the checkpoints for all; ValueError on every process
    when another run has out_dir. Take it before opening out_dir's checkpoints: opening deletes the
    unfinished checkpoint folders it finds there, which may be another run's save in progress."""
    refused = ''
    if jax.process_index() == 0:
        try:
            take_lock(out_dir)
        except ValueError as e:
            refused = str(e)
    if max_over_processes(int(bool(refused))) and not refused:
        refused = f"out_dir {out_dir!r} is in use by another run: see the error of process 0"
    if refused:
        raise ValueError(refused)


# -----------------------------------------------------------------------------
# faults: stop signals, divergence, out of memory

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def catch_stop_signals():
    """From now on SIGTERM (a preempted machine) and SIGINT (^C) only ask training to stop: the
    returned list receives the signal's number, and the loop saves a checkpoint after the current
    iteration and exits. A second signal of the same kind acts at once, as it does by default."""
    received = []
    def handler(signum, frame):
        received.append(signum)  # no printing here: the signal may have interrupted a print
        signal.signal(signum, previous[signum])
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    return received


def stop_signal(received, at_sync_point):
    """The number of the stop signal received, 0 when none. With several processes all must stop
    at the same iteration, so they agree (the signal any of them received) at sync points only."""
    if jax.process_count() > 1 and not at_sync_point:
        return 0
    return max_over_processes(received[0] if received else 0)


@jax.jit
def all_finite(tree):
    """Whether every number in the arrays of tree is finite: neither NaN nor infinite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def out_of_memory_message(error, where, state_bytes, remat, fsdp, n_devices):
    """The one line for XLA's out of memory error in where, 'the training step' or 'evaluation':
    what XLA was allocating, the bytes of params and optimizer state on each device (state_bytes),
    and what to try among what the run does not do yet (remat, which only the training step's
    backward pass gains from, and fsdp on n_devices)."""
    size = lambda n: f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
    allocating = re.search(r'allocat\w* (\d+) bytes', str(error))
    what = f"allocating {size(int(allocating[1]))}" if allocating else error_reason(error)
    tries = ["a smaller --batch_size with more --gradient_accumulation_steps (the same tokens per iteration)"]
    if not remat and where == 'the training step':
        tries.append("--remat=True")
    if not fsdp and n_devices > 1:
        tries.append("--fsdp=True")
    return (f"out of memory in {where} ({what}, with {size(state_bytes)} of params and optimizer state per "
            f"device): try {', or '.join(tries)}")


# -----------------------------------------------------------------------------
# processes

def init_distributed():
    """Join the other processes of a multi-host run, when there is one. Set JAX_COORDINATOR_ADDRESS
    (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host, or run under
    SLURM, Open MPI or a Cloud TPU VM (libtpu installed), whose settings jax finds itself."""
    env = os.environ
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # used by the CPU backend alone
    if 'JAX_NUM_PROCESSES' in env:
        jax.distributed.initialize(coordinator_address=env.get('JAX_COORDINATOR_ADDRESS'),
                                   num_processes=int(env['JAX_NUM_PROCESSES']),
                                   process_id=int(env['JAX_PROCESS_ID']))
    elif int(env.get('SLURM_NTASKS', 1)) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', 1)) > 1 \
            or importlib.util.find_spec('libtpu') is not None:
        jax.distributed.initialize()


def max_over_processes(n):
    """The largest of the numbers n that the processes give (a collective: all of them must call it)."""
    if jax.process_count() == 1:
        return n
    return int(multihost_utils.process_allgather(np.int32(n)).max())
