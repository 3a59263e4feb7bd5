"""
The training machinery of train_jax.py (and bench_jax.py):
- devices: the CPU as one device per core, the mesh over every device of every process, the
  compute dtype, the device's peak FLOP/s for MFU;
- batches: random windows of the token files, a pure function of (seed, iteration, stream);
- the optimizer: nanoGPT's AdamW with its weight decay mask and its one learning rate schedule;
- the jitted steps: evaluation, and the train step (all micro-steps, the gradient mean over the
  devices, clipping and the update in one call);
- sharding of the train state (replicated, or FSDP);
- faults: divergence.
"""

import collections
import concurrent.futures
import functools
import itertools
import math
import os
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax._src import xla_bridge  # skip_accelerator_plugins: no public setting for it
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

import accelerators
from jax_transformer import GPT

# -----------------------------------------------------------------------------
# devices

# CPU: a rough figure per core for large float32 matrix products; pass --peak_flops for your machine
# (bench_jax.py measures it). GPUs and TPUs: accelerators.py's table.
CPU_PEAK_FLOPS_PER_CORE = 100e9


def device_peak_flops(device):
    """Peak FLOP/s of one jax device; None when the device is unknown."""
    if device.platform == 'cpu':
        return CPU_PEAK_FLOPS_PER_CORE * (os.cpu_count() or 1) / jax.local_device_count()
    return accelerators.peak_flops(device.device_kind)


def configure_devices(device, cpu_devices, batches):
    """Call before anything touches a device. device 'cpu' forces the CPU; any other value
    ('cuda', 'tpu', ...) leaves JAX its default backend: the GPUs/TPUs when present, else the CPU
    (which JAX_PLATFORMS, when set, chooses).
    On CPU the cores become cpu_devices JAX devices sharing the batch, which is faster than one
    device on all cores; 0 picks the most devices, up to one per core, over which every
    (n_batches, batch_size) of batches splits (see batch_layout). A count set in XLA_FLAGS wins."""
    if device == 'cpu' or ('JAX_PLATFORMS' not in os.environ and accelerators.attached() is None):
        # the CPU; with none attached, jax need not try the GPU and TPU packages installed (and print pages)
        jax.config.update('jax_platforms', 'cpu')
        skip_accelerator_plugins()
    if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
        if cpu_devices == 0:
            cpu_devices = max(n for n in range(1, (os.cpu_count() or 1) + 1)
                              if all(n_batches % n == 0 or batch_size % n == 0 for n_batches, batch_size in batches))
        jax.config.update('jax_num_cpu_devices', cpu_devices)
        if cpu_devices > 1:  # a core per device: threading each device's matrix products only adds contention,
            # and ordering the work for threads to run side by side keeps far more of it in memory at once
            # (at batch 64 x 128: 541 against 370 MiB, no slower; docs/performance.md)
            os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + (
                ' --xla_cpu_multi_thread_eigen=false --xla_cpu_enable_concurrency_optimized_scheduler=false')


def skip_accelerator_plugins():
    """Keep jax from loading the GPU and TPU plugins installed (jax[cuda13], libtpu) in a process that
    runs on the CPU: jax loads every plugin's libraries when it starts, about 430 MiB of memory the
    run never uses. jax has no setting for it, so its record that the plugins were loaded is set
    beforehand (a jax without that record loads them, as before)."""
    if hasattr(xla_bridge, '_plugins_registered'):
        xla_bridge._plugins_registered = True


def use_compilation_cache(cache_dir):
    """Keep what XLA compiles in cache_dir, so that the next run with the same shapes (a resume,
    another run of the config, sampling again) loads its programs instead of compiling them; the
    least recently used go when it holds more than 2 GiB. '' turns it off; a
    JAX_COMPILATION_CACHE_DIR set in the environment wins."""
    if cache_dir and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
        jax.config.update('jax_compilation_cache_dir', os.path.expanduser(cache_dir))
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
        jax.config.update('jax_compilation_cache_max_size', 2 ** 31)


def make_mesh(devices=None):
    """A 1-D mesh named 'data' over devices, by default every device of every process. Auto axes
    let XLA propagate shardings (an embedding gather on a batch-sharded input needs no annotations)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ('data',), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


def mesh_platform(mesh):
    """The platform of the mesh's devices, 'cpu', 'gpu' or 'tpu': what the programs are compiled for,
    which every choice that depends on the hardware follows (not JAX's default backend, which is the
    CPU when compile_jax.py compiles for devices that are not there)."""
    return mesh.devices.flat[0].platform


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


def compiled_for(mesh, per_device):
    """The GPTConfig fields that say which devices a model is compiled for: the mesh's platform,
    whether cuDNN's fused attention runs there (NVIDIA, compute capability 8.0 or more), and how
    many devices share the batch the model is traced with: 1 when each device traces its own rows
    (per_device, see traced_per_device), else all of the mesh's."""
    device = mesh.devices.flat[0]
    return dict(platform=mesh_platform(mesh), cudnn=accelerators.compute_capability(device) >= 8.0,
                batch_shards=1 if per_device else mesh.size)


def resolve_dtype(dtype, mesh):
    """The compute dtype name (one checks.check_dtype lets through) on the mesh's devices: 'auto'
    is bfloat16 where they compute it fast (TPUs, GPUs from NVIDIA's A100 on), else float32."""
    if dtype == 'auto':
        return 'bfloat16' if accelerators.fast_bfloat16(mesh.devices.flat[0]) else 'float32'
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


def mean_loss(params, apply_fn, x, y):
    """Mean loss over batches x, y (n, B, T), dropout off."""
    return jnp.mean(jax.lax.map(lambda b: loss_fn(params, apply_fn, b[0], b[1], None), (x, y)))


@jax.jit
def eval_loss(state, x, y):
    """Mean loss over batches x, y (n, B, T), dropout off, the model traced for all of them."""
    return mean_loss(state.params, state.apply_fn, x, y)


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


def per_device(mesh, f, out_specs):
    """f(params, x, y) run by each device of the mesh on its own rows of x, y (steps, rows, T),
    params replicated: the model is traced for one device's share of the batch, which its
    attention rule sees, and holds no collective until f's own. check_vma off: each device's
    values stay its own until f averages them."""
    return jax.shard_map(f, mesh=mesh, in_specs=(P(), P(None, 'data'), P(None, 'data')), out_specs=out_specs,
                         check_vma=False)


def device_mean_grads(mesh, params, apply_fn, x, y, dropout_key):
    """mean_grads, each device of the mesh on its own rows of x, y, then averaged over the devices
    once, after the micro-steps, as nanoGPT's DDP averages its ranks' gradients after the last
    (equal to mean_grads on all rows unless targets hold -1). On CPU devices in one all-reduce of a
    flat vector: XLA's CPU all-reduce costs about the same for one array as for many times its
    size (docs/performance.md); GPUs and TPUs combine the arrays' own."""
    flat = mesh_platform(mesh) == 'cpu'

    def device_grads(params, x, y):
        key = jax.random.fold_in(dropout_key, jax.lax.axis_index('data'))  # each device its own masks
        grads, loss = mean_grads(params, apply_fn, x, y, key)
        if not flat:
            return jax.lax.pmean((grads, loss), 'data')
        vector, unflatten = ravel_pytree(grads)
        vector, loss = jax.lax.pmean((vector, loss), 'data')
        return unflatten(vector), loss
    return per_device(mesh, device_grads, (P(), P()))(params, x, y)


def _train_step(state, x, y, dropout_key, mesh=None):
    """One optimizer step over the micro-batches x, y (GA, B, T): the mean gradient (mean_grads, or
    device_mean_grads over mesh), clipped and applied by the optimizer. Returns the new state and
    the mean loss."""
    dropout_key = jax.random.fold_in(dropout_key, state.step)
    if mesh is None:
        grads, loss = mean_grads(state.params, state.apply_fn, x, y, dropout_key)
    else:
        grads, loss = device_mean_grads(mesh, state.params, state.apply_fn, x, y, dropout_key)
    return state.apply_gradients(grads=grads), loss


def traced_per_device(mesh, fsdp):
    """Whether each device of the mesh traces the model for its own rows (per_device): always but
    with FSDP, whose sharded params XLA gathers for a model traced for the whole batch."""
    return mesh is not None and not fsdp


def make_train_step(state_sharding=None, mesh=None, fsdp=False):
    """The jitted train step. It donates the train state and returns the new one placed by
    state_sharding (a tree of shardings shaped like the state, see state_sharding; None lets XLA
    choose, which keeps a replicated state replicated). Given the mesh, without fsdp, each device
    computes its rows' gradients and they are averaged once (device_mean_grads); with fsdp, or
    without a mesh, XLA splits the work and places its collectives."""
    step = functools.partial(_train_step, mesh=mesh if traced_per_device(mesh, fsdp) else None)
    return jax.jit(step, donate_argnums=0, out_shardings=(state_sharding, None))


def make_eval_step(mesh=None, fsdp=False):
    """The jitted evaluation, eval_loss(state, x, y), each device on its own rows as the train step
    (the mean of the devices' means, all rows being as many), else eval_loss."""
    if not traced_per_device(mesh, fsdp):
        return eval_loss

    @jax.jit
    def eval_loss_per_device(state, x, y):
        device_loss = lambda params, x, y: jax.lax.pmean(mean_loss(params, state.apply_fn, x, y), 'data')
        return per_device(mesh, device_loss, P())(state.params, x, y)
    return eval_loss_per_device


def eval_call_steps(steps, most=8):
    """How many of an evaluation's steps one call runs: the largest divisor of steps up to most, so
    that a stop waits for a few batches only and the calls' overhead stays small beside them."""
    return max(n for n in range(1, min(steps, most) + 1) if steps % n == 0)


def lowered_steps(state, state_sharding, mesh, fsdp, block_size, eval_layout, train_layout=None, dropout_key=None):
    """The programs of a training run, lowered for the devices of mesh, which need not be at hand
    (state and dropout_key may be shapes, jax.ShapeDtypeStruct): {'evaluation': make_eval_step's
    on eval_call_steps of eval_layout's steps (a call each, so that a stop need not wait for all of
    them), 'the training step': make_train_step's on batches of train_layout, when given}. What
    train_jax.py runs is what compile_jax.py measures."""
    batches = lambda layout: [batch_spec(mesh, layout, block_size)] * 2
    eval_call = (eval_call_steps(eval_layout[0]), eval_layout[1])
    lowered = {'evaluation': make_eval_step(mesh, fsdp).lower(state, *batches(eval_call))}
    if train_layout is not None:
        step = make_train_step(state_sharding, mesh, fsdp)
        lowered['the training step'] = step.lower(state, *batches(train_layout), dropout_key)
    return lowered


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


def with_sharding(abstract, sharding):
    """abstract (a tree of shapes and dtypes) with each leaf placed by the matching leaf of sharding."""
    return jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), abstract, sharding)


def bytes_per_device(abstract_state, sharding):
    """The bytes one device holds of the arrays of abstract_state placed by sharding (a tree of
    shardings shaped like it)."""
    return sum(math.prod(s.shard_shape(np.shape(x))) * np.result_type(x).itemsize
               for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(sharding)))


# -----------------------------------------------------------------------------
# faults: divergence (out of memory: memory.py)

@jax.jit
def all_finite(tree):
    """Whether every number in the arrays of tree is finite: neither NaN nor infinite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))
