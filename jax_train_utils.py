"""
The training machinery of train_jax.py (and bench_jax.py):
- devices: the CPU as one device per core, the mesh over every device of every process, the
  compute dtype, the device's peak FLOP/s for MFU;
- batches: random windows of the token files, a pure function of (seed, iteration, stream);
- the optimizer: nanoGPT's AdamW with its weight decay mask and its one learning rate schedule;
- the jitted steps: evaluation, and the train step (all micro-steps, the gradient mean over the
  devices, clipping and the update in one call);
- sharding of the train state (replicated, or FSDP);
- faults: divergence, out of memory.
"""

import collections
import concurrent.futures
import functools
import itertools
import math
import os
import re
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_transformer import GPT

# -----------------------------------------------------------------------------
# devices

# Dense bfloat16 peak FLOP/s of one device, matched against jax's device_kind (lower case).
# CPU: a rough figure per core for large float32 matrix products; pass --peak_flops for your machine
# (bench_jax.py measures it).
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


def batch_layout(n_batches, batch_size, n_devices, name='gradient_accumulation_steps', shared_memory=False):
    """How n_batches batches of batch_size rows run on n_devices data parallel devices, as
    (steps, rows per step): whole batches per device when n_devices divides n_batches (nanoGPT's
    DDP divides gradient_accumulation_steps by its world size), else each batch split over the
    devices. Devices in one shared_memory (a CPU's cores) split each batch first where they can:
    they then hold one batch's activations at a time, as PyTorch on the same cores, not one each.
    The rows, and so the mean loss and gradient, are the same for any n_devices.
    ValueError, saying what would work, when neither divides; name is n_batches' config key."""
    if shared_memory and batch_size % n_devices == 0:
        return n_batches, batch_size
    if n_batches % n_devices == 0:
        return n_batches // n_devices, batch_size * n_devices
    if batch_size % n_devices == 0:
        return n_batches, batch_size
    round_up = lambda n: -(-n // n_devices) * n_devices
    raise ValueError(f"{name}={n_batches} and batch_size={batch_size} cannot be split over {n_devices} devices: "
                     f"make one of them a multiple of {n_devices} (e.g. --{name}={round_up(n_batches)} "
                     f"or --batch_size={round_up(batch_size)})")


def resolve_dtype(dtype):
    """The compute dtype name (one checks.check_dtype lets through): 'auto' is bfloat16 on GPU/TPU
    and float32 on CPU."""
    if dtype == 'auto':
        return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
    return dtype


# -----------------------------------------------------------------------------
# data

# the random streams of batches: each iteration draws its training batches and its evaluation batches
# of each split from streams of their own
TRAIN_STREAM = 0
EVAL_STREAMS = {'train': 1, 'val': 2}


def batch_starts(data_path, seed, iter_num, stream, layout, block_size):
    """Where the random windows of one iteration's batches start in the token file, shape layout
    (steps, rows). A pure function of (seed, iteration, stream) and the number of rows, whatever
    the devices and processes, so resume is exact and results do not depend on the topology;
    stream is TRAIN_STREAM or one of EVAL_STREAMS."""
    n_tokens = os.path.getsize(data_path) // 2
    rng = np.random.default_rng([seed, iter_num, stream])
    return rng.integers(0, n_tokens - block_size, size=math.prod(layout)).reshape(layout)


def batch_spec(mesh, layout, block_size):
    """The shape, dtype and sharding of get_batch's x and y for batches of layout (steps, rows)."""
    return jax.ShapeDtypeStruct(layout + (block_size,), jnp.int32, sharding=NamedSharding(mesh, P(None, 'data')))


def get_batch(mesh, data_path, starts, block_size):
    """The windows of the uint16 token file at starts (steps, rows): inputs x and next tokens y,
    global int32 arrays (steps, rows, T) split along the rows over the mesh's 'data' axis (see
    batch_spec). Each process reads the rows of its own devices only. The memmap is re-opened on
    every call, as in nanoGPT, to keep its pages from piling up."""
    data = np.memmap(data_path, dtype=np.uint16, mode='r')
    spec = batch_spec(mesh, starts.shape, block_size)
    shape, sharding = spec.shape, spec.sharding
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


def lr_schedule(learning_rate, decay_lr, warmup_iters, lr_decay_iters, min_lr):
    """The learning rate as a function of the iteration, for the optimizer (of its traced step
    count) and the log line (of a Python int): get_lr, or learning_rate throughout without decay_lr."""
    if not decay_lr:
        return lambda it: learning_rate
    return lambda it: get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr)


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
    decay on the parameters where mask is True. learning_rate is a function of the update count.
    Written out rather than chained from optax's pieces so that each parameter is updated in one
    pass (docs/performance.md)."""
    def init(params):
        return AdamWState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(jnp.zeros_like, params),
                          nu=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params):
        lr = learning_rate(state.count)
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


def configure_optimizer(params, schedule, weight_decay, beta1, beta2, grad_clip):
    """AdamW with nanoGPT's weight decay mask and the learning rate schedule(step count) (see
    lr_schedule), after global-norm clipping (grad_clip 0 disables it). The schedule reads the
    optimizer's own step count, so it resumes with the optimizer state."""
    mask = decay_mask(params)
    sizes = [(p.size, m) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))]
    for decayed, name in ((True, 'decayed'), (False, 'non-decayed')):
        n = [s for s, m in sizes if m == decayed]
        print(f"num {name} parameter tensors: {len(n)}, with {sum(n):,} parameters")
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
    ranks' gradients (equal to mean_grads on all rows unless targets hold -1): XLA's CPU all-reduce
    costs about the same for one array as for many times its size (docs/performance.md)."""
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
# faults: divergence, out of memory

@jax.jit
def all_finite(tree):
    """Whether every number in the arrays of tree is finite: neither NaN nor infinite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def memory_advice(where, remat, fsdp, attention, n_devices, resuming):
    """What to try when where ('the training step' or 'evaluation') needs more memory than the
    devices have, among what the run does not do yet: remat helps the training step's backward
    pass alone, fsdp needs several devices, a resumed run keeps its checkpoint's block_size."""
    tries = ["a smaller --batch_size with more --gradient_accumulation_steps (the same tokens per iteration)"]
    if not remat and where == 'the training step':
        tries.append("--remat=True")
    if attention != 'blockwise':
        tries.append("--attention=blockwise")
    if not fsdp and n_devices > 1:
        tries.append("--fsdp=True")
    if not resuming:
        tries.append("a shorter --block_size")
    return ', or '.join(tries)


def size(n):
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def out_of_memory_message(error, where, state_bytes, advice):
    """The one line for XLA's out of memory error in where, 'the training step' or 'evaluation':
    what XLA was allocating, the bytes of params and optimizer state on each device (state_bytes),
    and what to try (see memory_advice)."""
    allocating = re.search(r'allocat\w* (\d+) bytes', str(error))
    what = f"allocating {size(int(allocating[1]))}" if allocating else str(error).strip().splitlines()[0].split('. ')[0]
    return (f"out of memory in {where} ({what}, with {size(state_bytes)} of params and optimizer state per "
            f"device): try {advice}")


def free_memory(device):
    """Bytes a device may still allocate, None where that is unknown: what a GPU or TPU has free; on
    the CPU, the machine's available memory (within the process's address space limit), shared by
    all the process's CPU devices."""
    if device.platform != 'cpu':
        stats = device.memory_stats() or {}
        return stats['bytes_limit'] - stats.get('bytes_in_use', 0) if 'bytes_limit' in stats else None
    try:
        with open('/proc/meminfo') as f:
            free = 1024 * next(int(line.split()[1]) for line in f if line.startswith('MemAvailable:'))
        with open('/proc/self/statm') as f:
            in_use = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')  # the address space this process holds
    except (OSError, StopIteration, ValueError):  # not Linux
        return None
    import resource  # Unix only
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        free = min(free, limit - in_use)
    return free // jax.local_device_count()


def memory_shortage(compiled, where, resident_bytes, advice):
    """The one line saying that the compiled program of where ('the training step', 'evaluation'
    or 'sampling') cannot fit in the devices' free memory, before it runs, and what to try (see
    memory_advice); None when it fits, or either figure is unknown. It allocates its inputs and
    temporaries, and its outputs that do not reuse a donated input, all but resident_bytes of its
    inputs being on the devices already."""
    stats, device = compiled.memory_analysis(), jax.local_devices()[0]
    free = free_memory(device)
    if stats is None or free is None:
        return None
    need = (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes - resident_bytes)
    if need <= free:
        return None
    n = jax.local_device_count()
    if device.platform == 'cpu':
        needs = f"{size(n * need)} of memory" + (f" ({n} CPU devices x {size(need)})" if n > 1 else "")
        has = f"the {size(n * free)} available"
    else:
        needs, has = f"{size(need)} on each device", f"the {size(free)} free on a {device.device_kind}"
    return f"{where} needs {needs}, more than {has}: try {advice}"
