"""
This training script runs on one device (CPU, GPU, TPU) and, with data parallelism over a device
mesh, on all the devices of one machine or of many.

To run on one machine, with all its GPUs/TPUs (or on its CPU):
$ python train_jax.py --batch_size=32

To run on several hosts, start the same command on each, with the environment telling each
process who it is, e.g. on the first of 2 nodes (the master, IP 123.456.123.456):
$ JAX_COORDINATOR_ADDRESS=123.456.123.456:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train_jax.py
and on the second: the same with JAX_PROCESS_ID=1. Under SLURM, Open MPI or on a Cloud TPU pod
this is found out automatically.
"""

import os
import sys
import time
import pickle
import subprocess
from functools import partial

from configurator import configure, config_keys, die

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, script exits right after the first eval
always_save_checkpoint = True  # if True, always save a checkpoint after each eval
init_from = 'scratch'  # 'scratch' or 'resume' or 'gpt2*' or a Hugging Face GPT-2 folder
# wandb logging
wandb_log = False  # disabled by default
wandb_project = 'owt'
wandb_run_name = 'gpt2'  # 'run' + str(time.time())
# data
dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8  # used to simulate larger batch sizes
batch_size = 12  # if gradient_accumulation_steps > 1, this is the micro-batch size
block_size = 1024
data_root = 'data'  # the folder holding <dataset>/train.bin, val.bin and meta.pkl
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # do we use bias inside LayerNorm and Linear layers?
remat = False  # recompute each block's activations in the backward pass: less memory, more compute
# adamw optimizer
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
backend = 'nccl'  # ignored: JAX picks its collectives (NCCL on GPU, gloo between CPU processes)
device = 'cuda'  # 'cpu' forces the CPU; any other value uses the GPUs/TPUs when present, else the CPU
dtype = 'auto'  # 'float32' or 'bfloat16' compute ('auto': bfloat16 on GPU/TPU, float32 on CPU)
compile = True  # ignored: JAX always compiles the training step with XLA
seed = 1337  # seeds the init, the dropout and the data sampling
peak_flops = 0.0  # peak FLOP/s of one device, for MFU; 0.0 looks the device up
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
config = {k: globals()[k] for k in config_keys(globals())}  # will be useful for logging
# -----------------------------------------------------------------------------

GPT2_MODELS = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
if init_from not in ('scratch', 'resume') + GPT2_MODELS and not os.path.isdir(init_from):
    die(f"init_from={init_from!r}: use 'scratch', 'resume', one of {', '.join(GPT2_MODELS)} "
        f"or an existing folder holding a Hugging Face GPT-2")
if init_from == 'resume' and not os.path.isdir(out_dir):
    die(f"init_from='resume' but out_dir {out_dir!r} does not exist")

import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_train_utils as tu
from jax_transformer import (GPTConfig, init_params, param_shapes, count_params, crop_block_size, estimate_mfu,
                             from_pretrained)

tu.configure_devices(device, batch_size)
tu.init_distributed()
master_process = jax.process_index() == 0  # this process does logging, checkpointing etc.
try:
    dtype = tu.resolve_dtype(dtype)
except ValueError as e:
    die(str(e))
world_size = tu.data_parallel_size()
if gradient_accumulation_steps % world_size != 0:
    die(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the "
        f"number of data parallel workers ({world_size})")
gradient_accumulation_steps //= world_size  # micro-steps per worker
local_batch = batch_size * world_size // jax.process_count()  # rows this process reads per micro-step
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
devices = jax.devices()
if master_process:
    print(f"devices: {len(devices)} x {devices[0].device_kind} in {jax.process_count()} process(es), "
          f"{world_size} data parallel worker(s), compute dtype {dtype}")
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
    os.makedirs(out_dir, exist_ok=True)
mesh = tu.make_mesh()
replicated = NamedSharding(mesh, P())
# XLA's CPU collectives can deadlock with several steps queued on several CPU devices: keep one in flight
one_step_in_flight = jax.default_backend() == 'cpu' and len(devices) > 1

# data: prepare the small datasets on first use
data_dir = os.path.join(data_root, dataset)
if not os.path.exists(os.path.join(data_dir, 'train.bin')):
    prepare = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset, 'prepare.py')
    if dataset not in ('shakespeare_char', 'shakespeare'):
        die(f"{data_dir}/train.bin not found" +
            (f": prepare it first with `python {prepare}`" if os.path.exists(prepare) else ""))
    if master_process:
        print(f"{data_dir}/train.bin not found, preparing it with {prepare}")
        if subprocess.run([sys.executable, prepare, f'--out_dir={data_dir}']).returncode != 0:
            die(f"preparing {dataset} failed")
    multihost_utils.sync_global_devices('data prepared')


def get_batch(split, iter_num, n_steps, stream):
    """(n_steps, B, T) global batches of split, for iteration iter_num."""
    rng = tu.batch_rng(seed, iter_num, stream)
    x, y = tu.get_batch(os.path.join(data_dir, f'{split}.bin'), rng, n_steps * local_batch, block_size)
    return tu.shard_batch(mesh, x, y, n_steps)


# init these up here, can override if init_from='resume' (i.e. from a checkpoint)
iter_num = 0
best_val_loss = 1e9

# attempt to derive vocab_size from the dataset
meta_path = os.path.join(data_dir, 'meta.pkl')
meta_vocab_size = None
if os.path.exists(meta_path):
    with open(meta_path, 'rb') as f:
        meta_vocab_size = pickle.load(f)['vocab_size']
    print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")

# model init
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  bias=bias, vocab_size=None, dropout=dropout,
                  gelu_approximate=False)  # start with model_args from command line
manager = tu.checkpoint_manager(out_dir)
ckpt_meta = tu.restore_meta(manager)
if init_from != 'resume' and ckpt_meta is not None:
    die(f"out_dir {out_dir!r} already holds a checkpoint (iter {ckpt_meta['iter_num']}): "
        f"continue it with --init_from=resume or choose another --out_dir")
key = jax.random.key(seed)
if init_from == 'scratch':
    print("Initializing a new model from scratch")
    if meta_vocab_size is None:
        print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
    model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
    model_config = GPTConfig(**model_args, dtype=dtype)
    params = jax.jit(init_params, static_argnums=0, out_shardings=replicated)(model_config, key)
elif init_from == 'resume':
    print(f"Resuming training from {out_dir}")
    if ckpt_meta is None:
        die(f"init_from='resume' but {out_dir!r} holds no checkpoint")
    # force these config attributes to be equal otherwise we can't even resume training
    # the rest of the attributes (e.g. dropout) can stay as desired from command line
    for k in ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'gelu_approximate']:
        model_args[k] = ckpt_meta['model_args'][k]
    model_config = GPTConfig(**model_args, dtype=dtype)
    params = None  # restored below, with the optimizer state
    iter_num = ckpt_meta['iter_num']
    best_val_loss = ckpt_meta['best_val_loss']
else:
    print(f"Initializing from OpenAI GPT-2 weights: {init_from}")
    try:
        model_config, params = from_pretrained(init_from, dropout=dropout, dtype=dtype)
    except ValueError as e:
        die(str(e))
    if block_size > model_config.block_size:
        die(f"block_size={block_size} is larger than the block_size {model_config.block_size} of {init_from}")
    # read off the created config params, so we can store them into checkpoint correctly
    for k in ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'gelu_approximate']:
        model_args[k] = getattr(model_config, k)
    params = jax.device_put(params, replicated)

# crop down the model block size if desired, using model surgery
if block_size < model_config.block_size:
    params, model_config = crop_block_size(params, model_config, block_size)
    model_args['block_size'] = block_size  # so that the checkpoint will have the right value
model_config = GPTConfig(**{**model_config.__dict__, 'remat': remat})  # not a shape: not in the checkpoint

# optimizer
abstract_params = param_shapes(model_config)
tx = tu.configure_optimizer(abstract_params, learning_rate, weight_decay, beta1, beta2, grad_clip,
                            decay_lr, warmup_iters, lr_decay_iters, min_lr)
if init_from == 'resume':
    abstract_state = jax.eval_shape(partial(tu.create_train_state, model_config, tx=tx), abstract_params)
    state = tu.restore_train_state(manager, abstract_state, iter_num, replicated)
else:
    # the params are donated: a second copy of gpt2-xl would cost 6 GB at start
    state = jax.jit(tu.create_train_state, static_argnums=(0, 2), out_shardings=replicated,
                    donate_argnums=1)(model_config, params, tx)
n_params = count_params(state.params)
print(f"number of parameters: {n_params / 1e6:.2f}M")
if peak_flops == 0.0:
    peak_flops = tu.device_peak_flops(devices[0]) or 0.0
dropout_key = jax.random.fold_in(key, 1)


def estimate_loss():
    """Mean loss over eval_iters batches of each split, dropout off, on all devices."""
    out = {}
    for stream, split in ((1, 'train'), (2, 'val')):
        x, y = get_batch(split, iter_num, eval_iters, stream)
        out[split] = float(tu.eval_loss(state, x, y))
    return out


def get_lr(it):
    return float(tu.get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr)) if decay_lr else learning_rate


# logging
if wandb_log and master_process:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# training loop
x, y = get_batch('train', iter_num, gradient_accumulation_steps, 0)  # fetch the very first batch
t0 = time.time()
iters_timed = 0  # iterations since t0
local_iter_num = 0  # number of iterations in the lifetime of this process
running_mfu = -1.0
while True:
    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0:
        losses = estimate_loss()
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if wandb_log and master_process:
            wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'],
                       "lr": get_lr(iter_num), "mfu": running_mfu * 100})
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses['val']
            if iter_num > 0 and iter_num != manager.latest_step():
                if master_process:
                    print(f"saving checkpoint to {out_dir}")
                tu.save_checkpoint(manager, state, {
                    'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                    'config': config})
        t0, iters_timed = time.time(), 0  # time the training iterations only
    if eval_only:
        break

    # one jitted step runs all the micro-steps, the gradient accumulation and the update
    state, loss = tu.train_step(state, x, y, dropout_key)
    # fetch the next batch while the device works on this step
    x, y = get_batch('train', iter_num + 1, gradient_accumulation_steps, 0)
    if one_step_in_flight:
        jax.block_until_ready(loss)
    iters_timed += 1

    # timing and logging
    if iter_num % log_interval == 0 and master_process:
        lossf = float(loss)  # waits for the device: the mean loss over this iteration's micro-steps
        t1 = time.time()
        dt = (t1 - t0) / iters_timed  # mean time per iteration since the last log
        t0, iters_timed = t1, 0
        if local_iter_num >= 5 and peak_flops > 0:  # let the training loop settle a bit
            fwdbwd_per_iter = batch_size * gradient_accumulation_steps * world_size
            mfu = estimate_mfu(model_config, n_params, fwdbwd_per_iter, dt, peak_flops * len(devices))
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {running_mfu * 100:.2f}%")
    iter_num += 1
    local_iter_num += 1

    # termination conditions
    if iter_num > max_iters:
        break

manager.wait_until_finished()
