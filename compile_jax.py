"""
Compile a training run for GPUs or TPUs that are not here, on any machine, and say whether it fits
in their memory and what bounds its speed. train_jax.py's config keys (nanoGPT's), plus the target:
$ python compile_jax.py config/train_gpt2.py --target=8xa100-40gb       # nanoGPT's GPT-2 run, as it runs it
$ python compile_jax.py config/train_gpt2.py --target=v5e-8 --json=v5e-8.json
$ python compile_jax.py config/finetune_shakespeare.py --target=a100-40gb   # gpt2-xl's shape, no weights
$ python compile_jax.py config/train_shakespeare_char.py --target=h100

Targets (accelerators.py): a100-40gb, a100-80gb, h100, h200, N of them ('8xh100'), N on each of H
hosts ('2x8xh100'); Cloud TPU slices: v4-8 ..., v5e-1 ... v5e-256, v5p-8 ..., v6e-1 ...; cpu, this
machine. GPUs and TPUs need pip install -r requirements_compile.txt. The programs are the ones
train_jax.py would run there (the same code builds them); every figure is compiled, not run.
Exit code 1 when the run does not fit (with what to try), 2 for bad input.

A GPU's exact figures, read off the GPU itself, replace the table's:
$ python compile_jax.py --save_target_config=h100.textproto   # on the machine with the GPU
$ python compile_jax.py config/train_gpt2.py --target=8xh100 --target_config=h100.textproto
"""

import json as json_file  # `json` is a config key
import os
import sys
import time
from functools import partial

import accelerators
import checks
import interrupts
from configurator import configure, config_keys, die, or_die, script_defaults, quiet_on_closed_pipe

# -----------------------------------------------------------------------------
# train_jax.py's config keys and defaults, then this script's own
globals().update(script_defaults(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train_jax.py')))
target = ''  # what to compile for, e.g. 'h100', '8xa100-40gb', '2x8xh100', 'v5e-8', 'v4-32', 'cpu'
json = ''  # also write the figures to this file, as JSON
target_config = ''  # a file with a GPU's exact figures to compile with, instead of accelerators.py's (see the next)
save_target_config = ''  # on a machine with a GPU: write its target config to this file, and stop
vocab_size = 0  # 0: the dataset's meta.pkl when it is prepared, else GPT-2's 50304 (compiling reads no data)
sample = True  # also compile sample_jax.py's programs, at its default num_samples and max_new_tokens
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
quiet_on_closed_pipe()  # its output piped to head, say
interrupts.quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143, at once
config = {k: globals()[k] for k in config_keys(globals())}
# -----------------------------------------------------------------------------

checks.check_train_config(config)
if save_target_config:  # jax on this machine's GPU
    text = or_die(accelerators.local_target_config)
    with open(save_target_config, 'w') as f:
        f.write(text)
    print(f"wrote the target config of this machine's GPU to {save_target_config}: compile for it anywhere with "
          f"--target_config={save_target_config}")
    sys.exit(0)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the programs are compiled here, for devices that are not
if not target:
    die(f"say what to compile for with --target=: {accelerators.known_targets()}")
if init_from == 'resume':
    die("compile_jax.py compiles a config, not a checkpoint: give it the config and --init_from the run started with")

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

import hlo_costs
import jax_train_utils as tu
import memory
from gpt2_weights import GPT2_MODELS, pretrained_config
from jax_sampling import compiled_generation
from jax_transformer import GPTConfig, param_shapes, count_params, estimate_mfu

if init_from not in ('scratch',) + GPT2_MODELS and not os.path.isdir(init_from):
    die(f"init_from={init_from!r}: use 'scratch', one of {', '.join(GPT2_MODELS)} or a Hugging Face GPT-2 folder")

# the devices: the target's, made by jax without the hardware, or this machine's CPU as train_jax.py uses it
if target == 'cpu':
    tu.configure_devices('cpu', cpu_devices, [(gradient_accumulation_steps, batch_size), (eval_iters, batch_size)])
    devices, accelerator = jax.devices(), None
else:
    devices, accelerator = or_die(accelerators.target_devices, target, checks.read_text(target_config) or None)
mesh = tu.make_mesh(devices)
platform = tu.mesh_platform(mesh)
dtype = tu.resolve_dtype(dtype, mesh)
hosts = len({d.process_index for d in devices})
train_layout = or_die(tu.batch_layout, gradient_accumulation_steps, batch_size, len(devices),
                      'gradient_accumulation_steps', platform == 'cpu')
eval_layout = or_die(tu.batch_layout, eval_iters, batch_size, len(devices), 'eval_iters', platform == 'cpu')
print(f"target {target}: {len(devices)} x {devices[0].device_kind} in {hosts} host(s), {train_layout[0]} "
      f"micro-step(s) of {train_layout[1] // len(devices)} rows per device, compute dtype {dtype}"
      f"{', FSDP' if fsdp else ''}; compiled here, not run")

# the model's shape, as train_jax.py makes it
if init_from == 'scratch':
    vocab_size = vocab_size or checks.dataset_vocab_size(os.path.join(data_root, dataset)) or 50304
    model_config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                             vocab_size=vocab_size)
else:
    model_config = or_die(pretrained_config, init_from)
    if block_size > model_config.block_size:
        die(f"block_size={block_size} is larger than the block_size {model_config.block_size} of {init_from}")
# a shorter block_size crops the model, as train_jax.py does
model_config = GPTConfig(**{**model_config.__dict__, 'block_size': block_size, 'dropout': dropout, 'dtype': dtype,
                            'remat': remat, 'attention': attention,
                            **tu.compiled_for(mesh, tu.traced_per_device(mesh, fsdp))})

# the train state, as shapes placed on the devices
abstract_params = param_shapes(model_config)
get_lr = tu.lr_schedule(learning_rate, decay_lr, warmup_iters, lr_decay_iters, min_lr)
tx = tu.configure_optimizer(abstract_params, get_lr, weight_decay, beta1, beta2, grad_clip)
abstract_state = jax.eval_shape(partial(tu.create_train_state, model_config, tx=tx), abstract_params)
state_sharding = tu.state_sharding(mesh, abstract_state, fsdp, fsdp_min_size)
state = tu.with_sharding(abstract_state, state_sharding)
state_bytes = tu.bytes_per_device(abstract_state, state_sharding)
n_params = count_params(abstract_params)
replicated = NamedSharding(mesh, P())
dropout_key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
print(f"number of parameters: {n_params / 1e6:.2f}M, params and optimizer state {memory.size(state_bytes)} per device")

capacity = memory.free_memory(devices[0]) if accelerator is None else accelerators.usable_memory(accelerator)
peak = tu.device_peak_flops(devices[0]) if accelerator is None else accelerator.peak_flops


def compile_program(where, compile):
    """What compile() compiles, timed; None when the compiler finds it cannot fit (a TPU's does),
    which error_lines says. Bad input (an attention that cannot run there) stops the script."""
    print(f"compiling {where}...", end=' ', flush=True)
    t0 = time.time()
    try:
        program = or_die(accelerators.quietly, compile)  # without XLA's warnings
    except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        print(f"{time.time() - t0:.0f} s: does NOT fit")
        error_lines[where] = memory.out_of_memory_message(e, where, state_bytes, advice(where))
        return None
    print(f"{time.time() - t0:.0f} s")
    return program


def advice(where):
    """What to try when where does not fit."""
    if where.startswith('sampling'):
        return "fewer --num_samples at a time"
    if capacity is not None and state_bytes > capacity:
        return (f"--fsdp=True on more devices (the params and optimizer state alone take {memory.size(state_bytes)} "
                f"of each device)")
    return memory.memory_advice(where, remat, fsdp, attention, len(devices), False)


error_lines = {}  # where -> the one line saying it does not fit


def duration(seconds):
    return f"{seconds:,.3g} s" if seconds >= 1 else f"{seconds * 1000:,.3g} ms"


def decimal(n, unit):
    """n in the largest of T, G, M, k (powers of 1000) that keeps it at 1 or more, with unit."""
    scale, prefix = next(((s, p) for s, p in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')) if n >= s), (1, ''))
    return f"{n / scale:,.3g} {prefix}{unit}"


def fit(where, program):
    """Memory per device against the device's, printed, as figures; a program that does not fit
    leaves its line in error_lines. None stands for a program its compiler refused."""
    if program is None:
        return dict(fits=False, bytes_per_device=dict(state=state_bytes, capacity=capacity))
    need, stats = memory.program_bytes(program), program.memory_analysis()
    fits = capacity is None or need <= capacity
    if not fits:
        error_lines[where] = memory.memory_shortage(program, where, 0, advice(where), devices[0], capacity)
    has = f" of the {memory.size(capacity)} {'free on' if accelerator is None else 'of'} each " \
          f"{devices[0].device_kind}" if capacity else ""
    print(f"{where}: {memory.size(need)} per device (inputs {memory.size(stats.argument_size_in_bytes)}, temporary "
          f"{memory.size(stats.temp_size_in_bytes)}){has}: {'fits' if fits else 'does NOT fit'}")
    return dict(fits=fits, bytes_per_device=dict(state=state_bytes, temp=stats.temp_size_in_bytes, total=need,
                                                 capacity=capacity))


def work(program, per, tokens, training):
    """What a program does each time it runs (per, e.g. 'per step'), on tokens per device: its
    attention, FLOPs and memory traffic, kernels, what bounds its time (and the training step's
    MFU), its collectives; printed, as figures."""
    text = program.as_text()
    costs = hlo_costs.program_costs(text)
    figures = dict(attention=hlo_costs.attention_in(text), flops=costs.flops, hbm_bytes=costs.memory_bytes,
                   bytes_accessed=costs.bytes, kernels=costs.kernels, loops_uncounted=costs.loops_uncounted,
                   collectives=dict(all_gather=costs.collectives.get('all_gather', 0),
                                    all_reduce=costs.collectives.get('all_reduce', 0),
                                    reduce_scatter=costs.collectives.get('reduce_scatter', 0),
                                    in_loop=costs.in_loop))
    print(f"  attention: {', '.join(figures['attention']) or 'none'}; {per}: {decimal(costs.flops, 'FLOP')}, "
          f"{decimal(costs.memory_bytes, 'B')} to and from device memory ({decimal(costs.bytes, 'B')} read and "
          f"written in all" + (", on-chip memory included" if platform == 'tpu' else "") + ")" +
          (f", {costs.kernels:,} kernel launches" if platform == 'gpu' else ""))
    if costs.loops_uncounted:
        print(f"  note: {costs.loops_uncounted} loop(s) of unknown length are counted once")
    if accelerator is not None:
        compute_s, memory_s = costs.flops / accelerator.peak_flops, costs.memory_bytes / accelerator.bandwidth
        bound = max(compute_s, memory_s)
        figures['bound_ms'] = bound * 1000
        if training:
            figures['mfu_bound'] = estimate_mfu(model_config, n_params, tokens / model_config.block_size, bound, peak)
        print(f"  bound: {duration(compute_s)} of arithmetic at {accelerator.peak_flops / 1e12:,.0f} TFLOP/s, "
              f"{duration(memory_s)} of memory traffic at {accelerator.bandwidth / 1e9:,.0f} GB/s: "
              f"{'memory' if memory_s > compute_s else 'compute'}-bound" +
              (f", MFU at most {figures['mfu_bound'] * 100:.0f}% (nanoGPT's formula" +
               (", which counts the masked half of attention too)" if figures['mfu_bound'] > 1 else ")")
               if training else ""))
    collectives = ', '.join(f"{n:,} {kind.replace('_', '-')}" for kind, n in sorted(costs.collectives.items()))
    print(f"  collectives: {collectives or 'none'}" + (f" ({costs.in_loop:,} inside loops)" if costs.in_loop else ""))
    heaviest = sorted(costs.by_source.items(), key=lambda item: -item[1][1])[:20]
    figures['sources'] = [dict(source=name, flops=f, hbm_bytes=b) for name, (f, b) in heaviest]
    if training:
        print("  most memory traffic, by the JAX code it comes from:")
        for name, (f, b) in heaviest[:5]:
            print(f"    {decimal(b, 'B'):>9} {decimal(f, 'FLOP'):>11}  {name}")
    return figures


# compile what train_jax.py compiles, then sampling's programs, and measure each
lowered = or_die(tu.lowered_steps, state, state_sharding, mesh, fsdp, block_size, eval_layout, train_layout,
                 dropout_key)
eval_call = tu.eval_call_steps(eval_layout[0])
tokens = {'the training step': train_layout[0] * train_layout[1] // len(devices) * block_size,
          'evaluation': eval_call * eval_layout[1] // len(devices) * block_size}
eval_calls = eval_layout[0] // eval_call
per = {'the training step': 'per step', 'evaluation': f'per evaluation call ({eval_calls} a split)'}
figures = {}
for where in ('the training step', 'evaluation'):
    program = compile_program(where, lowered[where].compile)
    figures[where] = fit(where, program)
    if program is not None:
        figures[where].update(work(program, per[where], tokens[where], where == 'the training step'))
if sample:
    sampling = script_defaults(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sample_jax.py'))
    n = sampling['num_samples']
    prompt = jax.ShapeDtypeStruct((n, 1), jax.numpy.int32,
                                  sharding=NamedSharding(mesh, P('data' if n % len(devices) == 0 else None)))
    params = tu.with_sharding(abstract_params, jax.tree.map(lambda _: replicated, abstract_params))
    sample_config = GPTConfig(**{**model_config.__dict__, 'dropout': 0.0, **tu.compiled_for(mesh, False)})  # as load_model
    generation = compile_program('sampling', lambda: compiled_generation(
        params, sample_config, prompt, 1, sampling['max_new_tokens'], sampling['temperature'], sampling['top_k'],
        sampling['top_p']))
    figures['sampling'] = fit(f"sampling ({n} samples of {sampling['max_new_tokens']} tokens)",
                              generation and max(generation, key=memory.program_bytes))

if json:
    with open(json, 'w') as f:
        json_file.dump(dict(target=target, devices=len(devices), hosts=hosts, device_kind=devices[0].device_kind,
                            **figures['the training step'], programs=figures, config=config), f, indent=2)
if error_lines:  # the first program that does not fit stops with what to try
    die(next(iter(error_lines.values())), code=1)
