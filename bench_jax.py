"""
Benchmark the training iteration of train_jax.py: the jitted step (all micro-steps and the AdamW
update) plus the host's batch sampling, in ms per iteration, on random tokens.
With --device=cpu it compares, in the same run, one JAX device with every core as a device.

$ python bench_jax.py --device=cpu    # nanoGPT's CPU shakespeare_char model
$ python bench_jax.py --batch_size=64 --block_size=256 --n_layer=6 --n_head=6 --n_embd=384 --dropout=0.2
"""
import os
import subprocess
import sys
import time

from configurator import configure

# -----------------------------------------------------------------------------
batch_size = 12  # micro-batch size
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
vocab_size = 65
dropout = 0.0
bias = False
gradient_accumulation_steps = 1
dtype = 'auto'  # 'float32', 'bfloat16' or 'auto'
device = 'cuda'  # 'cpu' forces the CPU
iters = 200  # timed iterations
warmup = 10  # iterations before timing (the first compiles)
cpu_devices = 0  # CPU devices to time on; 0 with --device=cpu compares 1 with every core
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])

if device == 'cpu' and cpu_devices == 0:
    # one process per layout: the CPU device count is fixed when jax starts
    results = {}
    for n in sorted({1, os.cpu_count() or 1}):
        out = subprocess.run([sys.executable, __file__] + sys.argv[1:] + [f'--cpu_devices={n}'],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        results[n] = float(out.stdout.split()[-2])
        print(out.stdout.splitlines()[-1])
    if len(results) == 2:
        one, many = results.values()
        print(f"every core as a device: {one / many:.2f}x the speed of one device")
    sys.exit(0)

import numpy as np
import jax

import jax_train_utils as tu
from jax_transformer import GPTConfig, init_params

tu.configure_devices(device, cpu_devices, [(gradient_accumulation_steps, batch_size)])
config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                   dropout=dropout, bias=bias, dtype=tu.resolve_dtype(dtype))
mesh = tu.make_mesh()
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
params = jax.device_put(init_params(config, jax.random.key(0)), replicated)
tx = tu.configure_optimizer(params, 1e-3, 0.1, 0.9, 0.99, 1.0, True, 100, 5000, 1e-4)
state = tu.create_train_state(config, params, tx)
layout = tu.batch_layout(gradient_accumulation_steps, batch_size, jax.device_count())
data = np.random.default_rng(0).integers(0, vocab_size, 1_000_000).astype(np.uint16)
data_path = '/tmp/bench_jax_tokens.bin'
data.tofile(data_path)
key = jax.random.key(1)


def batch(it):
    return tu.get_batch(mesh, data_path, tu.batch_starts(data_path, 0, it, 0, layout, block_size), block_size)


x, y = batch(0)
for it in range(warmup + iters):
    if it == warmup:
        jax.block_until_ready(state)
        t0 = time.time()
    state, loss = tu.train_step(state, x, y, key)
    x, y = batch(it + 1)
    if jax.default_backend() == 'cpu' and jax.device_count() > 1:
        jax.block_until_ready(loss)  # as train_jax.py does: XLA's CPU collectives deadlock with steps queued
jax.block_until_ready(state)
dt = (time.time() - t0) / iters
print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, dtype {config.dtype}, "
      f"batch {gradient_accumulation_steps} x {batch_size} x {block_size}: {dt * 1000:.2f} ms/iter")
