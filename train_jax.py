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

import host_memory
host_memory.use_huge_pages()  # first: it restarts the process when glibc has to be told (host_memory.py)
import interrupts
interrupts.quit_on_signal()  # ^C or SIGTERM end the run at once until it has something to save

import dataclasses
import math
import os
import signal
import sys
import time
import subprocess
from functools import partial

import checks
from configurator import configure, config_keys, die, or_die

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, script exits right after the first eval
hellaswag_interval = 0  # score HellaSwag (data_root/hellaswag) every this many iterations, as build-nanogpt; 0: never
always_save_checkpoint = True  # if True, always save a checkpoint after each eval
init_from = 'scratch'  # 'scratch' or 'resume' or 'gpt2*' or a Hugging Face GPT-2 folder
overwrite_checkpoint = False  # if True, a run not resuming replaces out_dir's checkpoint when it saves its own
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
attention = 'auto'  # 'dense', 'blockwise' (memory O(T)), 'cudnn' (NVIDIA), 'flash' (TPU); 'auto' picks by device
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
cpu_devices = 0  # on CPU, the JAX devices the cores become: 0 one per core (as the batch splits), 1 turns it off
fsdp = False  # shard params and optimizer state over the devices, for models too big for one device
fsdp_min_size = 2 ** 16  # with fsdp, arrays with fewer elements stay replicated on every device
peak_flops = 0.0  # peak FLOP/s of one device, for MFU; 0.0 looks the device up
compilation_cache = '~/.cache/nanogpt_jax'  # compiled programs kept for the next run of the same shapes; '' turns it off
join_timeout = 300  # multi-host: seconds for every process to join, else each says who came
process_timeout = 60  # multi-host: seconds without a sign of a process before the others stop; see README
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
config = {k: globals()[k] for k in config_keys(globals())}  # will be useful for logging
# -----------------------------------------------------------------------------

if init_from == 'resume' and not os.path.isdir(out_dir):
    die(f"init_from='resume' but out_dir {out_dir!r} does not exist")
checks.check_train_config(config)
checks.check_out_dir(out_dir)
if hellaswag_interval:  # read now: a missing or damaged file stops the run before any work
    hellaswag_examples, gpt2_encoding = checks.hellaswag_examples(data_root), checks.gpt2_encoding()

import numpy as np
import jax
from jax.experimental import multihost_utils
from tqdm import tqdm

import checkpoints
import hellaswag
import jax_train_utils as tu
import memory
import processes
from gpt2_weights import GPT2_MODELS, from_pretrained
from jax_transformer import (GPTConfig, ARCHITECTURE_KEYS, init_params, param_shapes, count_params,
                             crop_block_size, estimate_mfu)
from nanogpt_checkpoints import NANOGPT_CHECKPOINT

if init_from not in ('scratch', 'resume') + GPT2_MODELS and not os.path.isdir(init_from):
    die(f"init_from={init_from!r}: use 'scratch', 'resume', one of {', '.join(GPT2_MODELS)} "
        f"or an existing folder holding a Hugging Face GPT-2")

tu.configure_devices(device, cpu_devices, [(gradient_accumulation_steps, batch_size), (eval_iters, batch_size)])
tu.use_compilation_cache(compilation_cache)
processes.init_distributed(join_timeout, process_timeout, out_dir)
processes.check_same_everywhere(config, os.path.join(data_root, dataset))
master_process = jax.process_index() == 0  # this process does logging, checkpointing etc.
if not eval_only:  # one training run per out_dir; eval_only reads the checkpoint alone, as sampling does
    or_die(checkpoints.lock_out_dir, out_dir)
mesh = tu.make_mesh()
platform = tu.mesh_platform(mesh)  # what the programs are compiled for
dtype = tu.resolve_dtype(dtype, mesh)
try:
    # one iteration is gradient_accumulation_steps x batch_size rows, however many devices share it
    cpu = platform == 'cpu'  # its devices share the machine's memory
    train_layout = tu.batch_layout(gradient_accumulation_steps, batch_size, jax.device_count(), shared_memory=cpu)
    eval_layout = tu.batch_layout(eval_iters, batch_size, jax.device_count(), name='eval_iters', shared_memory=cpu)
except ValueError as e:
    die(str(e))
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
devices = jax.devices()
if master_process:
    print(f"devices: {len(devices)} x {devices[0].device_kind} in {jax.process_count()} process(es), "
          f"{train_layout[0]} micro-step(s) of {train_layout[1] // len(devices)} rows per device, "
          f"compute dtype {dtype}{', FSDP' if fsdp else ''}")
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
# XLA's CPU collectives can deadlock with several steps queued on several CPU devices: keep one in flight
one_step_in_flight = cpu and len(devices) > 1

# data: prepare the small datasets on first use
data_dir = os.path.join(data_root, dataset)
if not os.path.exists(os.path.join(data_dir, 'train.bin')):
    prepare = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', dataset, 'prepare.py')
    if dataset not in ('shakespeare_char', 'shakespeare'):
        checks.dataset_missing(data_root, dataset, prepare)
    if master_process:
        print(f"{data_dir}/train.bin not found, preparing it with {prepare}")
        prepared = subprocess.run([sys.executable, prepare, f'--out_dir={data_dir}'], stderr=subprocess.PIPE, text=True)
        if prepared.returncode != 0:  # its own error line, with the command that gives it a local input
            errors = [line[len('error: '):] for line in prepared.stderr.splitlines() if line.startswith('error: ')]
            die(f"preparing {dataset} failed: " + (errors[-1] if errors else prepared.stderr.strip()[-300:]).replace(
                'pass --input=PATH', f'prepare it with `python {prepare} --input=PATH --out_dir={data_dir}`'))
    multihost_utils.sync_global_devices('data prepared')
for split in ('train', 'val'):
    checks.check_token_file(os.path.join(data_dir, f'{split}.bin'), block_size)


def get_batch(split, iter_num, layout, stream):
    """The global batches x, y (steps, rows, T) of split for iteration iter_num."""
    data_path = os.path.join(data_dir, f'{split}.bin')
    starts = tu.batch_starts(data_path, seed, iter_num, stream, layout, block_size)
    return tu.get_batch(mesh, data_path, starts, block_size)


# init these up here, can override if init_from='resume' (i.e. from a checkpoint)
iter_num = 0
best_val_loss = 1e9
best_step = None  # the iteration of the checkpoint of best_val_loss, which a stop keeps beside its own
local_iter_num = 0  # number of iterations in the lifetime of this process

# attempt to derive vocab_size from the dataset
meta_path = os.path.join(data_dir, 'meta.pkl')
meta_vocab_size = None
if os.path.exists(meta_path):
    meta_vocab_size = checks.read_meta(meta_path, ['vocab_size'])['vocab_size']
    print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")

# model init
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  bias=bias, vocab_size=None, dropout=dropout,
                  gelu_approximate=False)  # start with model_args from command line
manager = checkpoints.checkpoint_manager(out_dir, read_only=eval_only)
param_sharding = lambda config: tu.state_sharding(mesh, param_shapes(config), fsdp, fsdp_min_size)
if init_from != 'resume' and manager.latest_step() is not None and not overwrite_checkpoint:
    die(f"out_dir {out_dir!r} already holds a checkpoint (iter {manager.latest_step()}): continue it with "
        f"--init_from=resume, choose another --out_dir, or replace it with --overwrite_checkpoint=True")
if init_from != 'resume' and os.path.exists(os.path.join(out_dir, NANOGPT_CHECKPOINT)) and not overwrite_checkpoint:
    die(f"out_dir {out_dir!r} holds nanoGPT's checkpoint {NANOGPT_CHECKPOINT}: continue it with "
        f"--init_from=resume, choose another --out_dir, or train anew beside it with --overwrite_checkpoint=True")
key = jax.random.key(seed)
if init_from == 'scratch':
    print("Initializing a new model from scratch")
    if meta_vocab_size is None:
        print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
    model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
    model_config = GPTConfig(**model_args)
    params = jax.jit(init_params, static_argnums=0, out_shardings=param_sharding(model_config))(model_config, key)
elif init_from == 'resume':
    print(f"Resuming training from {out_dir}")
    # this port's latest checkpoint, or nanoGPT's ckpt.pt when that is newer
    checkpoint = or_die(checkpoints.newest_checkpoint, manager)
    checks.check_resume(checkpoint.meta, block_size, meta_vocab_size, meta_path)
    # force these config attributes to be equal otherwise we can't even resume training
    # the rest of the attributes (e.g. dropout) can stay as desired from command line
    for k in ARCHITECTURE_KEYS:
        model_args[k] = checkpoint.meta['model_args'][k]
    ignored = [k for k in ('n_layer', 'n_head', 'n_embd', 'bias') if config[k] != model_args[k]]
    if ignored:
        print("note: resuming the checkpoint's model, whose " +
              ", ".join(f"{k}={model_args[k]} (not {config[k]})" for k in ignored) + " are its own")
    model_config = GPTConfig(**model_args)
    params = None  # restored below, with the optimizer state
    iter_num = checkpoint.meta['iter_num']
    best_val_loss = checkpoint.meta['best_val_loss']
    best_step = checkpoints.best_step(manager, or_newest=False)
else:
    print(f"Initializing from OpenAI GPT-2 weights: {init_from}")
    model_config, params = or_die(from_pretrained, init_from)
    print(f"overriding dropout rate to {dropout}")
    if block_size > model_config.block_size:
        die(f"block_size={block_size} is larger than the block_size {model_config.block_size} of {init_from}")
    # read off the created config params, so we can store them into checkpoint correctly
    for k in ARCHITECTURE_KEYS:
        model_args[k] = getattr(model_config, k)
    params = jax.device_put(params, param_sharding(model_config))

# crop down the model block size if desired, using model surgery
if block_size < model_config.block_size:
    params, model_config = crop_block_size(params, model_config, block_size)
    model_args['block_size'] = block_size  # so that the checkpoint will have the right value
# how this run computes, which is not in the checkpoint
model_config = dataclasses.replace(model_config, dropout=dropout, dtype=dtype, remat=remat, attention=attention,
                                   **tu.compiled_for(mesh, tu.traced_per_device(mesh, fsdp)))

# every token of the data must be in the model's vocabulary
vocab_from = {'scratch': meta_path if meta_vocab_size else "GPT-2's, padded", 'resume': "the checkpoint's"}
for split in ('train', 'val'):
    checks.check_token_ids(os.path.join(data_dir, f'{split}.bin'), model_config.vocab_size,
                           vocab_from.get(init_from, init_from))
if hellaswag_interval:
    checks.check_hellaswag_vocab(model_config.vocab_size, gpt2_encoding)
    hellaswag_rows = hellaswag.process_rows(hellaswag_examples, gpt2_encoding, model_config.block_size)

# optimizer
abstract_params = param_shapes(model_config)
get_lr = tu.lr_schedule(learning_rate, decay_lr, warmup_iters, lr_decay_iters, min_lr)
tx = tu.configure_optimizer(abstract_params, get_lr, weight_decay, beta1, beta2, grad_clip)
abstract_state = jax.eval_shape(partial(tu.create_train_state, model_config, tx=tx), abstract_params)
state_sharding = tu.state_sharding(mesh, abstract_state, fsdp, fsdp_min_size)
if init_from == 'resume':
    if checkpoint.nanogpt is not None and int(checkpoint.nanogpt[1][0]) != iter_num:
        # nanoGPT's float16 loss scaling skips steps
        print(f"note: the optimizer of nanoGPT's checkpoint made {int(checkpoint.nanogpt[1][0])} steps in "
              f"{iter_num} iterations; the learning rate schedule follows its steps")
    state = or_die(checkpoints.restore_train_state, manager, checkpoint, abstract_state, state_sharding)
    del checkpoint  # nanoGPT's weights, read on the host, are on the devices now
else:
    # the params are donated: a second copy of gpt2-xl would cost 6 GB at start
    state = jax.jit(tu.create_train_state, static_argnums=(0, 2), out_shardings=state_sharding,
                    donate_argnums=1)(model_config, params, tx)
state_bytes = tu.bytes_per_device(abstract_state, state_sharding)
if master_process:
    print(f"params and optimizer state: {state_bytes / 2**20:,.1f} MiB per device")
n_params = count_params(state.params)
print(f"number of parameters: {n_params / 1e6:.2f}M")
if peak_flops == 0.0:
    peak_flops = tu.device_peak_flops(devices[0]) or 0.0
    if not peak_flops and master_process:
        print(f"note: the peak FLOP/s of a {devices[0].device_kind} is not known here, so no MFU is shown: "
              f"set it with --peak_flops=")
dropout_key = jax.random.fold_in(key, 1)

# logging: wandb starts before any work, so that a missing login stops the run at once
if wandb_log and master_process:
    import wandb
    try:
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    except Exception as e:  # wandb's UsageError, CommError, ...: no login, no network
        die(f"wandb_log=True, but wandb cannot start ({type(e).__name__}: {str(e).strip().splitlines()[0]}): log in "
            f"with `wandb login` or WANDB_API_KEY, or log offline with WANDB_MODE=offline")

# compile the steps now: a run that cannot fit in the devices' memory stops before any work
memory_advice = lambda where: memory.memory_advice(where, remat, fsdp, attention, len(devices), init_from == 'resume')


def out_of_memory(error, where):
    """Stop with what to change when the devices ran out of memory; any other error goes on up."""
    if 'RESOURCE_EXHAUSTED' not in str(error):
        raise error
    die(memory.out_of_memory_message(error, where, state_bytes, memory_advice(where)), code=1)


def compile_to_fit(where, lowered):
    """The compiled program of where; the run stops if it cannot fit in the devices' memory."""
    try:
        program = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # a TPU's compiler refuses a program too big for its memory
        out_of_memory(e, where)
    shortage = memory.memory_shortage(program, where, state_bytes, memory_advice(where))
    if processes.max_over_processes(int(shortage is not None)):  # all processes stop, not one
        die(shortage or f"{where} does not fit in the memory of another process's devices: see its error", code=1)
    return program


if not eval_only:  # from now on a stop saves a checkpoint to resume from
    interrupts.stop_at_safe_point("the compilation in progress")
    if master_process:
        interrupts.on_quit(lambda: checkpoints.remove_unfinished_saves(out_dir))  # a save a second ^C cut short
if master_process:
    print("compiling " + ("evaluation" if eval_only else "the training step and evaluation"), flush=True)
compile_start = time.time()
try:
    lowered = tu.lowered_steps(state, state_sharding, mesh, fsdp, block_size, eval_layout,
                               None if eval_only else train_layout, dropout_key)
except ValueError as e:  # an attention that cannot run here
    die(str(e))
eval_step = compile_to_fit('evaluation', lowered['evaluation'])
if not eval_only:
    train_step = compile_to_fit('the training step', lowered['the training step'])
host_memory.release_free_memory()  # what compiling took, before the steps take theirs


def estimate_loss():
    """Mean loss over eval_iters batches of each split, dropout off, on all devices; None when a stop
    signal came first. A few batches a call (see tu.eval_call_steps), one call in flight, so that a
    stop waits for those only."""
    out = {}
    per_call = tu.eval_call_steps(eval_layout[0])
    with progress_bar(2 * eval_layout[0], f"step {iter_num}: evaluating", ' batches') as bar:
        for split, stream in tu.EVAL_STREAMS.items():
            data_path = os.path.join(data_dir, f'{split}.bin')
            starts = tu.batch_starts(data_path, seed, iter_num, stream, eval_layout, block_size)
            losses = []
            for step in range(0, eval_layout[0], per_call):
                batch = tu.get_batch(mesh, data_path, starts[step:step + per_call], block_size)
                losses.append(eval_step(state, *batch))
                jax.block_until_ready(losses[-1:] if one_step_in_flight else losses[-2:-1])
                bar.update(per_call)
                if not eval_only and processes.signal_received():
                    return None
            out[split] = float(np.mean([float(loss) for loss in losses]))
    return out


def first_iter_seconds():
    """About how long the first iteration takes, from the evaluation before it (a forward pass is
    about a third of a training step's work), or None without one."""
    rows_evaluated = 2 * eval_iters * batch_size
    return 3 * eval_seconds / rows_evaluated * gradient_accumulation_steps * batch_size if eval_seconds else None


def stop_after_the_iteration():
    """A stop from now on waits for the next iteration to end: about how long it takes (None: not known)."""
    expected = iter_seconds or first_iter_seconds()
    interrupts.stop_at_safe_point("the iteration in progress" + (f" (about {duration(expected)})" if expected else ""))
    return expected


def wait_showing_progress(loss, expected):
    """Wait for the iteration's step to end, with a bar on stderr once it has run for a few seconds:
    the seconds so far, of about expected (None: not known yet)."""
    start = time.time()
    shown = '{desc}: {n} s of about {total} s' if expected else '{desc}: {n} s'
    with progress_bar(round(expected) if expected else None, f"iter {iter_num}", 's', shown) as bar:
        while not loss.is_ready():
            time.sleep(0.05)
            bar.update(int(time.time() - start) - bar.n)


def duration(seconds):
    """seconds as '1h02m', '3m05s' or '12s'."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def progress_bar(total, desc, unit, bar_format=None):
    """A progress bar on stderr (process 0's), shown once the work has taken a few seconds; less often
    into a log than on a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, bar_format=bar_format, delay=3, leave=False,
                disable=not master_process, mininterval=0.5 if sys.stderr.isatty() else 10, file=sys.stderr)


def save_checkpoint(stopping=False):
    """Write the state at iter_num, never a diverged one: the last good checkpoint stays. With
    always_save_checkpoint=False the checkpoint a stop writes is kept beside the best one."""
    global best_step
    if not tu.all_finite(state.params):
        diverged("the parameters are not finite")
    if master_process:
        print(f"saving checkpoint to {out_dir}")
    # data_root as an absolute path: sampling finds the dataset's meta.pkl wherever it is started
    meta = {'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
            'config': dict(config, data_root=os.path.abspath(data_root))}
    beside_best = stopping and not always_save_checkpoint
    try:
        checkpoints.save_checkpoint(manager, state, dict(meta, stopped=True) if beside_best else meta,
                                    keep=best_step if beside_best else None)
        best_step = best_step if beside_best else iter_num
    except OSError as e:
        processes.wait_for_lost_process()  # a save that fails on a multi-host run may be the sign of a lost process
        last = manager.latest_step()
        die(f"saving the checkpoint to {out_dir!r} failed: {e}; " +
            (f"the last complete checkpoint (iter {last}) is kept: fix that and resume with --init_from=resume"
             if last is not None else "no complete checkpoint is left"), code=1)
    metrics_saved()


def stop_for(signum):
    """Stop the run on the stop signal signum: save a checkpoint to resume from (unless out_dir holds
    this iteration's already) and exit with 128 + signum, as a shell reports a process killed by it."""
    if master_process:
        print(f"{signal.Signals(signum).name} received: stopping at iter {iter_num}")
    if not (local_iter_num == 0 and init_from == 'resume' and manager.latest_step() == iter_num):
        save_checkpoint(stopping=True)
    if wandb_log and master_process:
        wandb.finish()
    processes.leave_together(128 + signum)


def diverged(what):
    """Stop every process of a run whose loss went NaN or infinite, exit code 1."""
    last = manager.latest_step()
    die(f"iter {iter_num}: {what}: training diverged; " +
        (f"the last checkpoint in {out_dir!r} (iter {last}) is kept: resume it with a lower --learning_rate"
         if last is not None else "no checkpoint was written"), code=1)


# every log line and evaluation also goes to out_dir/metrics.csv, for plot_jax.py; a resumed run
# continues the file from its checkpoint's iteration, an eval_only run leaves it alone
write_metrics, metrics_saved = lambda **row: None, lambda: None
if master_process and not eval_only:
    # a run replacing a checkpoint keeps the old metrics.csv, which is that checkpoint's, until its first save
    write_metrics, metrics_saved = checkpoints.metrics_writer(
        out_dir, keep_before=iter_num if init_from == 'resume' else 0, until_saved=overwrite_checkpoint)

# training loop
# the training batches are read and moved to the devices on a background thread, two ahead
train_batches = tu.prefetch(lambda it: get_batch('train', it, train_layout, tu.TRAIN_STREAM), iter_num)
t0 = time.time()
iters_timed = 0  # iterations since t0
running_mfu = -1.0
iter_seconds, eval_seconds = None, 0.0  # the last log's time per iteration, the last evaluation's
if not eval_only and processes.signal_received():  # during the compilation
    stop_for(processes.signal_received())
if not eval_only and iter_num % eval_interval == 0:  # a stop from now on waits for what comes first
    interrupts.stop_at_safe_point("the evaluation batch in progress")
elif not eval_only:
    stop_after_the_iteration()
if master_process:
    print(f"compiled in {time.time() - compile_start:.1f} s")
while True:
    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0 or eval_only:  # eval_only evaluates once, at any iteration
        if not eval_only:
            interrupts.stop_at_safe_point("the evaluation batch in progress")
        eval_start = time.time()
        try:
            losses = estimate_loss()
        except jax.errors.JaxRuntimeError as e:
            out_of_memory(e, 'evaluation')
        if losses is None:
            stop_for(processes.signal_received())
        eval_seconds = time.time() - eval_start
        stop_after_the_iteration()
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            write_metrics(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'],
                          lr=float(get_lr(iter_num)))
        if not (math.isfinite(losses['train']) and math.isfinite(losses['val'])):
            diverged(f"eval loss is {losses['train']} (train), {losses['val']} (val)")
        if wandb_log and master_process:
            wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'],
                       "lr": float(get_lr(iter_num)), "mfu": running_mfu * 100})
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses['val']
            if local_iter_num > 0:  # not the state this run started from
                save_checkpoint()
        t0, iters_timed = time.time(), 0  # time the training iterations only
    if hellaswag_interval and iter_num % hellaswag_interval == 0:
        # a micro-batch's rows a step: 4 rows an example, each as long as its context and ending
        interrupts.stop_at_safe_point("the HellaSwag batch in progress")
        scores = hellaswag.evaluate(state.params, model_config, hellaswag_rows, mesh, max(1, batch_size // 4),
                                    stopped=processes.signal_received)
        if scores is None:
            stop_for(processes.signal_received())
        stop_after_the_iteration()
        if master_process:
            print(f"step {iter_num}: hellaswag acc_norm {scores['acc_norm']:.4f}, acc {scores['acc']:.4f} "
                  f"({scores['count']:,} examples)")
            write_metrics(iter=iter_num, hellaswag_acc=scores['acc'], hellaswag_acc_norm=scores['acc_norm'])
        if wandb_log and master_process:
            wandb.log({"iter": iter_num, "hellaswag/acc": scores['acc'], "hellaswag/acc_norm": scores['acc_norm']})
        t0, iters_timed = time.time(), 0
    if eval_only:
        break

    # one jitted step runs all the micro-steps, the gradient accumulation and the update
    expected = stop_after_the_iteration()
    try:
        x, y = next(train_batches)
        state, loss = train_step(state, x, y, dropout_key)
        if master_process and (iter_seconds or 3) >= 3:  # a long iteration shows how long it has run
            wait_showing_progress(loss, expected)
        if one_step_in_flight or local_iter_num == 0:  # a step too big for memory fails by the end of the first
            jax.block_until_ready(loss)
    except jax.errors.JaxRuntimeError as e:
        out_of_memory(e, 'the training step')
    iters_timed += 1

    # timing and logging
    if iter_num % log_interval == 0:
        lossf = float(loss)  # waits for the device: the mean loss over this iteration's micro-steps
    if iter_num % log_interval == 0 and master_process:
        t1 = time.time()
        dt = iter_seconds = (t1 - t0) / iters_timed  # mean time per iteration since the last log
        t0, iters_timed = t1, 0
        evals_left = max_iters // eval_interval - iter_num // eval_interval
        time_left = (max_iters - iter_num) * dt + evals_left * eval_seconds
        if local_iter_num >= 5 and peak_flops > 0:  # let the training loop settle a bit
            fwdbwd_per_iter = batch_size * gradient_accumulation_steps
            mfu = estimate_mfu(model_config, n_params, fwdbwd_per_iter, dt, peak_flops * len(devices))
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        mfu_text = f"{running_mfu * 100:.2f}%" if peak_flops > 0 else "n/a"
        print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, mfu {mfu_text}, {duration(time_left)} left")
        write_metrics(iter=iter_num, loss=lossf, lr=float(get_lr(iter_num)), time_ms=dt * 1000,
                      mfu_percent=running_mfu * 100 if running_mfu >= 0 else None)
    # a diverged run stops before it can save; every process looks, so that all of them stop
    if iter_num % log_interval == 0 and not math.isfinite(lossf):
        diverged(f"loss is {lossf}")
    iter_num += 1
    local_iter_num += 1

    # termination conditions
    stop = processes.stop_signal(iter_num, iter_num % log_interval == 0 or iter_num > max_iters)
    if stop:
        stop_for(stop)
    if iter_num > max_iters:
        break
interrupts.quit_on_signal()  # the run is over: a stop now has nothing to wait for
if wandb_log and master_process:
    wandb.finish()
processes.leave_together(0)  # now: a ^C during Python's own ending would find no one to answer it
