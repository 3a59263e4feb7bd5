"""
A much shorter version of train_jax.py for benchmarking, like nanoGPT's bench.py: it times the
training iteration (batch sampling, all micro-steps and the AdamW update, as train_jax.py runs it)
and prints compile time, ms/iter (median), tokens/s and MFU.

$ python bench_jax.py config/train_shakespeare_char_cpu.py --compare_torch=True --nanogpt_dir=../nanoGPT
  # nanoGPT's CPU config, beside nanoGPT's own model.py trained as its train.py does
$ python bench_jax.py --compare_torch=True        # GPT-2 124M, batch 12 x 1024, bf16 on a GPU
$ python bench_jax.py --sample=True --device=cpu  # generate in one call, streamed, and without the key/value cache
$ python bench_jax.py config/train_shakespeare_char_cpu.py --profile=True  # trace + top XLA ops
$ python bench_jax.py config/train_shakespeare_char_cpu.py --compare_torch=True --points=64x128,256x32,1024x8
  # several (block_size x batch_size) points: ms/iter, tokens/s and peak memory of each contender
"""
import glob
import gzip
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import nullcontext

import numpy as np

import host_memory
host_memory.use_huge_pages()  # first, as in train_jax.py: it restarts the process when glibc has to be told
import checks
import interrupts
from configurator import configure, die, quiet_on_closed_pipe, script_defaults

# -----------------------------------------------------------------------------
batch_size = 12  # micro-batch size
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 0  # 0: the dataset's meta.pkl when it has one, else GPT-2's 50304
dropout = 0.0
bias = False
remat = False  # recompute each block's activations in the backward pass
attention = 'auto'  # 'dense', 'blockwise' or 'cudnn' attention; 'auto' picks (see jax_attention.attention)
gradient_accumulation_steps = 1  # micro-steps per iteration, shared by the devices as in train_jax.py
real_data = True  # random windows of data_root/dataset/train.bin when it is prepared; False: random tokens
dataset = 'openwebtext'
data_root = 'data'
seed = 1337
device = 'cuda'  # 'cpu' forces the CPU; as in train_jax.py each core is then a JAX device
cpu_devices = 0  # on CPU, the JAX devices the cores become: 0 one per core (as the batch splits), 1 turns it off
dtype = 'auto'  # 'float32' or 'bfloat16' compute ('auto': bfloat16 on GPU/TPU, float32 on CPU)
num_steps = 50  # timed iterations of each contender (after warm-up)
warmup_steps = 5  # untimed iterations of each contender first
peak_flops = 0.0  # peak FLOP/s of one device, for MFU; 0.0: look it up (GPU/TPU) or measure it (CPU)
profile = False  # write a jax.profiler trace of the timed steps to profile_dir, print the top ops
profile_dir = 'bench_trace'
profile_ops = 25  # rows of the profile's table of the most expensive ops
compare_torch = False  # also time a PyTorch model of the same shape, eager and torch.compile, interleaved
torch_model = 'nanoGPT'  # compare_torch's: 'nanoGPT' (nanogpt_dir's model.py, as its train.py trains it) or 'transformers'
nanogpt_dir = '../nanoGPT'  # a nanoGPT checkout: git clone https://github.com/karpathy/nanoGPT
points = ''  # 'TxB,TxB,...': time each (block_size x batch_size) point, each contender in a process of its own
rounds = 2  # with points or sample: the timed runs of each contender (at each point), alternated with the others'
only = ''  # time these contenders alone, separated by commas: 'jax', 'nanoGPT eager', 'nanoGPT compiled',
# 'transformers eager', 'transformers compiled' (points runs each in a process of its own)
sample = False  # instead of training: tokens/s of generate in one call, streamed, and without the key/value cache
max_new_tokens = 500  # sample=True: tokens generated after a one-token prompt, batch of one
stream_chunk = 8  # sample=True: tokens per device call when streamed, as sample_jax.py's
# -----------------------------------------------------------------------------
# train_jax.py's config files set keys of its own too
configure(globals(), sys.argv[1:], other_keys=script_defaults(os.path.join(os.path.dirname(__file__), 'train_jax.py')))
quiet_on_closed_pipe()  # its output piped to head, say
interrupts.quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143, at once
# -----------------------------------------------------------------------------
checks.check_dtype(dtype)
CONTENDERS = ['jax'] + [f'{model} {how}' for model in ('nanoGPT', 'transformers') for how in ('eager', 'compiled')]
if torch_model not in ('nanoGPT', 'transformers'):
    die(f"torch_model={torch_model!r}: use 'nanoGPT' or 'transformers'")
contenders = ['jax', f'{torch_model} eager', f'{torch_model} compiled'] if compare_torch else ['jax']
if only:
    contenders = only.split(',')
    if not set(contenders) <= set(CONTENDERS):
        die(f"only={only!r}: use one or more of {', '.join(map(repr, CONTENDERS))}")
if any(c.startswith('nanoGPT') for c in contenders) and not os.path.isfile(os.path.join(nanogpt_dir, 'model.py')):
    die(f"nanogpt_dir={nanogpt_dir!r} holds no model.py: point --nanogpt_dir= at a nanoGPT checkout (git clone "
        f"https://github.com/karpathy/nanoGPT), or time transformers' GPT-2 with --torch_model=transformers")


def run_alone(contender, block_size, batch_size):
    """What this script prints as its last line with --only=contender at one point, run in a process
    of its own, so that the peak memory is that contender's alone."""
    args = sys.argv[1:] + [f'--block_size={block_size}', f'--batch_size={batch_size}', f'--only={contender}',
                           '--points=']
    # PyTorch with the C library's memory settings as nanoGPT's train.py runs with them, not this script's
    env = os.environ if contender == 'jax' else host_memory.without_huge_pages(os.environ)
    p = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        die(f"{contender} at block_size={block_size}, batch_size={batch_size} failed: "
            f"{(p.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_points():
    """ms/iter, tokens/s and peak memory at each point of points, for each contender: the
    contenders run one after the other, rounds times, so that a busy machine slows them alike."""
    shapes = [tuple(int(n) for n in point.split('x')) for point in points.split(',')]
    results = defaultdict(list)
    for block_size, batch_size in shapes:
        for r in range(rounds):
            for contender in contenders:
                run = run_alone(contender, block_size, batch_size)
                results[block_size, batch_size, contender].append(run)
                print(f"{block_size} x {batch_size}, round {r + 1} of {rounds}: {contender} {run['ms']:.1f} ms/iter",
                      flush=True)
    print("block_size x batch_size: contender ms/iter, tokens/s, peak RSS (compiled: the steps' own memory)")
    for block_size, batch_size in shapes:
        ms = {c: float(np.median([r['ms'] for r in results[block_size, batch_size, c]])) for c in contenders}
        for c in contenders:
            runs = results[block_size, batch_size, c]
            compiled = f", compiled {max(r['compiled_mib'] for r in runs):,.0f} MiB" if c == 'jax' else ""
            speed = f", jax {ms[c] / ms['jax']:.2f}x its iterations/s" if c != 'jax' and 'jax' in ms else ""
            tokens_per_s = gradient_accumulation_steps * batch_size * block_size / (ms[c] / 1000)  # at the median
            spread = f", rounds {min(r['ms'] for r in runs):.1f}-{max(r['ms'] for r in runs):.1f} ms"
            print(f"{block_size} x {batch_size}: {c} {ms[c]:.1f} ms/iter, {tokens_per_s:,.0f} tokens/s, "
                  f"peak RSS {max(r['rss_mib'] for r in runs):,.0f} MiB{compiled}{speed}{spread}")


if points:
    bench_points()
    sys.exit(0)
if compare_torch:
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # leave GPU memory to PyTorch too
ga = gradient_accumulation_steps
if 'jax' in contenders or sample:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_train_utils as tu
    import memory
    from jax_transformer import GPT, GPTConfig, init_params, count_params, flops_per_token
    from jax_sampling import generate, generate_stream, sample_token

    tu.configure_devices(device, 1 if sample else cpu_devices, [(gradient_accumulation_steps, batch_size)])
    mesh = tu.make_mesh()
    device_type = tu.mesh_platform(mesh)
    try:
        dtype = tu.resolve_dtype(dtype, mesh)
        layout = tu.batch_layout(gradient_accumulation_steps, batch_size, jax.device_count(),  # as train_jax.py
                                 shared_memory=device_type == 'cpu')
    except ValueError as e:
        die(str(e))
else:  # PyTorch alone: JAX is not even imported, so that the memory is PyTorch's
    import torch
    device_type = 'cuda' if device != 'cpu' and torch.cuda.is_available() else 'cpu'
    dtype = {'auto': 'bfloat16' if device_type == 'cuda' else 'float32'}.get(dtype, dtype)
data_dir = os.path.join(data_root, dataset)
# real text repeats tokens, which random tokens hide (the embedding gradient's cost on a GPU): say which it is
if real_data and not os.path.exists(os.path.join(data_dir, 'train.bin')):
    print(f"data: random tokens, as {data_dir}/train.bin is not prepared (python data/{dataset}/prepare.py)")
    real_data = False
else:
    print(f"data: {f'real text, {data_dir}/train.bin' if real_data else 'random tokens (--real_data=False)'}")
vocab_size = vocab_size or checks.dataset_vocab_size(data_dir) or 50304
if 'jax' in contenders or sample:
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       dropout=dropout, bias=bias, dtype=dtype, remat=remat, attention=attention,
                       **tu.compiled_for(mesh, per_device=True))
    devices = jax.devices()
    print(f"{len(devices)} x {devices[0].device_kind}, ", end='')
print(f"compute dtype {dtype}, {n_layer} layers, {n_head} heads, n_embd {n_embd}, vocab {vocab_size}, " +
      (f"sampling 1 x {max_new_tokens} tokens" if sample else f"batch {ga} x {batch_size} x {block_size}"))


def measure_cpu_peak_flops(n=2048, reps=3):
    """FLOP/s of one CPU device on large float32 matrix products, all devices busy at once."""
    a = jax.device_put(jnp.ones((len(devices), n, n)), NamedSharding(mesh, P('data')))
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = min(timed(lambda: matmul(a).block_until_ready()) for _ in range(reps))
    return 2 * n ** 3 / best


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -----------------------------------------------------------------------------
# the training iteration of JAX and of PyTorch, on the same batches

def get_batch(rng, shape):
    """x, y (*shape, T) int32: random windows of train.bin, or random tokens. The memmap is opened
    on every call, as both training scripts do."""
    n = int(np.prod(shape))
    if real_data:
        data = np.memmap(os.path.join(data_dir, 'train.bin'), dtype=np.uint16, mode='r')
        ix = rng.integers(0, len(data) - block_size, n)
        xy = np.stack([data[i:i + block_size + 1] for i in ix])
    else:
        xy = rng.integers(0, vocab_size, (n, block_size + 1))
    xy = xy.astype(np.int32).reshape(shape + (block_size + 1,))
    return xy[..., :-1], xy[..., 1:]


# nanoGPT's defaults; they do not change the speed
OPTIMIZER = dict(learning_rate=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)


def jax_contender():
    """The train_jax.py iteration as a function of no arguments, after compiling it; and the
    compiled program's text, which names the operations of a profile."""
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(init_params(config, jax.random.key(seed)), replicated)
    schedule = tu.lr_schedule(OPTIMIZER['learning_rate'], True, 100, 5000, 6e-5)
    tx = tu.configure_optimizer(params, schedule, OPTIMIZER['weight_decay'], OPTIMIZER['beta1'],
                                OPTIMIZER['beta2'], OPTIMIZER['grad_clip'])
    state = tu.create_train_state(config, params, tx)
    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    batch_sharding = NamedSharding(mesh, P(None, 'data'))
    x, y = jax.device_put(get_batch(rng, layout), batch_sharding)
    t0 = time.perf_counter()
    step = tu.make_train_step(None, mesh).lower(state, x, y, key).compile()
    print(f"jax: compile {time.perf_counter() - t0:.2f} s, {count_params(params) / 1e6:.2f}M parameters")
    host_memory.release_free_memory()  # as train_jax.py does after compiling
    # a step that cannot fit stops here, as train_jax.py's does, rather than when the kernel kills it
    state_bytes = sum(getattr(a, 'nbytes', 0) for a in jax.tree.leaves(state))  # replicated: whole on each device
    advice = memory.memory_advice('the training step', remat, False, attention, len(devices), False)
    shortage = memory.memory_shortage(step, 'the training step', state_bytes, advice)
    if shortage:
        die(shortage, code=1)
    stats = step.memory_analysis()  # what the step allocates on each device, beyond the state
    compiled_bytes = len(devices) * (stats.argument_size_in_bytes + stats.temp_size_in_bytes
                                     + stats.output_size_in_bytes - stats.alias_size_in_bytes)

    def iteration():
        nonlocal state
        # the batch before the step: on 2 CPU devices, putting it during the step measured 5% slower
        x, y = jax.device_put(get_batch(rng, layout), batch_sharding)
        state, loss = step(state, x, y, key)
        return float(loss)  # waits for the step, as train_jax.py does on CPU
    return iteration, step.as_text(), compiled_bytes


def nanogpt_model():
    """nanoGPT's own GPT of the bench's shape (nanogpt_dir/model.py) and the AdamW its
    configure_optimizers makes; the loss of a batch as its forward computes it."""
    spec = importlib.util.spec_from_file_location('nanogpt_model', os.path.join(nanogpt_dir, 'model.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.GPT(module.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                                        n_embd=n_embd, dropout=dropout, bias=bias)).to(device_type)
    optimizer = model.configure_optimizers(OPTIMIZER['weight_decay'], OPTIMIZER['learning_rate'],
                                           (OPTIMIZER['beta1'], OPTIMIZER['beta2']), device_type)
    return model, optimizer, lambda forward, x, y: forward(x, y)[1]


def transformers_model():
    """transformers' GPT2LMHeadModel of the bench's shape, with AdamW as nanoGPT's (decay on the
    >= 2-dim weights); the loss of a batch as nanoGPT's forward computes it."""
    import torch
    import transformers
    hf = transformers.GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                                 n_head=n_head, activation_function='gelu', resid_pdrop=dropout,
                                 embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(hf).to(device_type)
    groups = [{'params': [p for p in model.parameters() if p.dim() >= 2], 'weight_decay': OPTIMIZER['weight_decay']},
              {'params': [p for p in model.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=OPTIMIZER['learning_rate'], betas=(OPTIMIZER['beta1'], OPTIMIZER['beta2']),
                                  fused=device_type == 'cuda')
    loss = lambda forward, x, y: torch.nn.functional.cross_entropy(forward(x).logits.view(-1, vocab_size), y.view(-1))
    return model, optimizer, loss


def torch_contender(name):
    """The contender name ('nanoGPT eager', 'transformers compiled', ...) trained as nanoGPT's
    train.py does: autocast to the compute dtype on a GPU, the next micro-batch read while the
    backward pass runs, global-norm clipping, AdamW, and the loss read at every iteration, as its
    log line (log_interval=1) does."""
    import torch
    model_name, how = name.split()
    torch.manual_seed(seed)
    model, optimizer, loss_of = (nanogpt_model if model_name == 'nanoGPT' else transformers_model)()
    forward = torch.compile(model) if how == 'compiled' else model
    autocast = torch.autocast(device_type, torch.bfloat16) if dtype == 'bfloat16' and device_type != 'cpu' \
        else nullcontext()
    rng = np.random.default_rng(seed)
    micro_batch = lambda: [torch.from_numpy(a.astype(np.int64)).to(device_type) for a in get_batch(rng, (batch_size,))]
    x, y = micro_batch()

    def iteration():
        nonlocal x, y
        for group in optimizer.param_groups:  # train.py sets the scheduled rate at every iteration
            group['lr'] = OPTIMIZER['learning_rate']
        for _ in range(ga):
            with autocast:
                loss = loss_of(forward, x, y) / ga
            x, y = micro_batch()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER['grad_clip'])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item() * ga  # the last micro-step's, as nanoGPT logs it
    t0 = time.perf_counter()
    with torch.no_grad(), autocast:
        first_loss = loss_of(forward, x, y).item()  # torch.compile compiles its forward here
    iteration()
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, loss at step 0 "
          f"{first_loss:.4f}, first iteration {time.perf_counter() - t0:.2f} s")
    return iteration


def jax_op_names(hlo_text):
    """XLA instruction name -> the JAX operation it was made from, layers merged ('h_*'), e.g.
    'backward/h_*/mlp/c_fc/dot_general'. Collectives keep XLA's name ('all-reduce')."""
    names = {}
    for name, op in re.findall(r'^\s*%?(\S+) = .*?op_name="([^"]*)"', hlo_text, re.M):
        if name.startswith('all-') or ':' in op:  # a collective, or ops merged from many places
            continue
        op = re.sub(r'^jit\([^)]*\)/|shard_map/|while/body/|closed_call/|eval_jaxpr/', '', op)  # wrappers
        op = op.replace('transpose(jvp(GPT))', 'backward').replace('jvp(GPT)', 'forward')
        names[name] = re.sub(r'h_\d+', 'h_*', op)
    return names


def top_ops(trace_dir, hlo_text, n=25):
    """The n most expensive JAX operations of the train step on device 0, in ms per step, from the
    newest trace in trace_dir (XLA's op names, when an op has no JAX name). Each XLA op counts its
    median time over the steps: on a shared machine a few runs are stretched by preemption. An op
    lasts until its 'end:' event: a matrix product left to Eigen returns before it is done."""
    path = max(glob.glob(os.path.join(trace_dir, 'plugins/profile/*/*.trace.json.gz')), key=os.path.getmtime)
    with gzip.open(path) as f:
        events = json.load(f)['traceEvents']
    ends = defaultdict(list)  # (thread, op) -> when each of its runs ended
    for e in events:
        if e.get('ph') == 'X' and e['name'].startswith('end: '):
            ends[e['tid'], e['name'][5:]].append(e['ts'])
    durations, runs = defaultdict(list), set()
    for e in events:
        args = e.get('args', {})
        if e.get('ph') == 'X' and 'hlo_op' in args and args.get('device_ordinal', '0') == '0':
            end = min((t for t in ends[e['tid'], e['name']] if t >= e['ts']), default=e['ts'] + e['dur'])
            durations[e['name']].append(max(end, e['ts'] + e['dur']) / 1000 - e['ts'] / 1000)
            runs.add(args.get('run_id'))
    names = jax_op_names(hlo_text)
    totals = defaultdict(float)
    for op, ms in durations.items():
        totals[names.get(op, re.sub(r'\.\d+$', '', op))] += float(np.median(ms)) * len(ms) / len(runs)
    print(f"device 0 busy {sum(totals.values()):.2f} ms per step, of which matrix products "
          f"{sum(ms for name, ms in totals.items() if 'dot_general' in name):.2f} ms")
    return sorted(totals.items(), key=lambda kv: -kv[1])[:n]


def bench_training():
    iterations, compiled_bytes = {}, None
    if 'jax' in contenders:
        iterations['jax'], step_text, compiled_bytes = jax_contender()
    for name in [c for c in contenders if c != 'jax']:
        try:
            iterations[name] = torch_contender(name)
        except Exception as e:  # torch.compile needs a working C++ compiler on CPU, Triton on GPU
            if 'compiled' not in name:
                raise
            print(f"torch.compile failed, timing eager only: {type(e).__name__}: {str(e).splitlines()[0]}")
    for iteration in iterations.values():
        for _ in range(warmup_steps):
            iteration()
    # interleave the contenders in short rounds, so that a busy machine slows them alike
    times, cpu_peaks = defaultdict(list), []
    steps_per_round = 5
    with jax.profiler.trace(profile_dir) if profile else nullcontext():
        for r in range(max(num_steps // steps_per_round, 1)):
            for name, iteration in iterations.items():
                times[name] += [timed(iteration) for _ in range(steps_per_round)]
            # in every round too, the machine may be shared; not with only, where its matrices would count in
            # the contender's peak memory
            if 'jax' in iterations and device_type == 'cpu' and not peak_flops and not profile and not only:
                cpu_peaks.append(measure_cpu_peak_flops())
    peak, n_devices = peak_flops, 1
    if 'jax' in iterations:
        peak, n_devices = peak_flops or tu.device_peak_flops(devices[0]), len(devices)
    if cpu_peaks:
        peak = max(cpu_peaks)
        print(f"cpu peak, measured on {len(devices)} x float32 2048^3 matrix products: {peak / 1e9:.0f} GFLOP/s per device")
    tokens = ga * batch_size * block_size
    flops = flops_per_token(config, count_params(init_params(config, jax.random.key(0)))) * tokens \
        if 'jax' in iterations else 0
    for name, t in times.items():
        dt = float(np.median(t))
        mfu = f"{flops / dt / (peak * n_devices) * 100:.1f}%" if peak and flops else "n/a (unknown device peak)"
        rounds_ms = [1000 * np.median(t[i:i + steps_per_round]) for i in range(0, len(t), steps_per_round)]
        print(f"{name}: {dt * 1000:.2f} ms/iter, {tokens / dt:,.0f} tokens/s, mfu {mfu}, "
              f"rounds {min(rounds_ms):.2f}-{max(rounds_ms):.2f} ms")
    for name in iterations:
        if name != 'jax' and 'jax' in iterations:
            print(f"jax / {name}: {np.median(times[name]) / np.median(times['jax']):.2f}x the iterations/s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"peak RSS {rss / 2**20:,.0f} MiB" + (f", the jax step's compiled memory {compiled_bytes / 2**20:,.0f} MiB"
                                                if compiled_bytes else ""))
    if profile:
        print(f"trace written to {profile_dir} (TensorBoard or ui.perfetto.dev); top XLA ops over the timed steps:")
        for name, ms in top_ops(profile_dir, step_text, profile_ops):
            print(f"{ms:8.3f} ms  {name}")
    if len(contenders) == 1:  # for bench_points, which runs each contender alone
        dt = float(np.median(times[contenders[0]]))
        print(json.dumps({'ms': dt * 1000, 'rss_mib': rss / 2**20,
                          'compiled_mib': (compiled_bytes or 0) / 2**20}))


# -----------------------------------------------------------------------------
# sampling: the key/value cache against nanoGPT's full forward over the growing context

def no_cache_next_token(params, padded, t, key):
    """The next token after the first t tokens of padded (B, L): the model over all L positions
    (the right padding cannot change the positions before it). The logits of position t - 1 are
    computed from ln_f's output; XLA drops the lm_head rows nobody uses."""
    _, state = GPT(config).apply({'params': params}, padded, mutable='intermediates',
                                 capture_intermediates=lambda m, _: m.name == 'ln_f')
    h = jax.lax.dynamic_slice_in_dim(state['intermediates']['ln_f']['__call__'][0], t - 1, 1, axis=1)
    logits = (h @ params['wte']['embedding'].T.astype(h.dtype)).astype(jnp.float32)  # (B, 1, V)
    return sample_token(logits, key, 1.0, 200)


def no_cache_generate(params, idx, key, next_token, bucket=64):
    """nanoGPT's generate: the model over the whole (cropped) context for every new token. The
    context is padded to a multiple of `bucket` so as not to compile once per length: each token
    pays for up to bucket - 1 positions more than in nanoGPT."""
    keys = jax.random.split(key, max_new_tokens)
    for i in range(max_new_tokens):
        t = min(idx.shape[1], block_size)
        padded = np.zeros((idx.shape[0], min(-(-t // bucket) * bucket, block_size)), np.int32)
        padded[:, :t] = idx[:, -t:]
        idx = np.concatenate([idx, np.asarray(next_token(params, padded, t, keys[i]))[:, None]], axis=1)
    return idx


def bench_sampling(bucket=64):
    params = init_params(config, jax.random.key(seed))
    idx, key = np.zeros((1, 1), np.int32), jax.random.key(seed)
    contenders = {  # both wait for the last token: generate returns NumPy, the stream yields the host's copy
        'kv cache': lambda: generate(params, config, idx, key, max_new_tokens, 1.0, 200),
        'kv cache, streamed': lambda: list(generate_stream(params, config, idx, 1, key, max_new_tokens, 1.0, 200,
                                                           chunk=stream_chunk)),
    }
    for fn in contenders.values():
        fn()  # compiles
    next_token = jax.jit(no_cache_next_token)
    for length in range(bucket, min(1 + max_new_tokens + bucket, block_size + 1), bucket):
        next_token(params, np.zeros((1, length), np.int32), 1, key).block_until_ready()  # compiles
    times, names = defaultdict(list), list(contenders)
    for r in range(rounds):  # alternated, each first in turn, so that a busy machine slows both alike
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(contenders[name]))
    times['no cache'].append(timed(lambda: no_cache_generate(params, idx, key, next_token, bucket)))
    for name, dts in times.items():
        dt = float(np.median(dts))
        print(f"{name}: {max_new_tokens} tokens in {dt:.2f} s, {max_new_tokens / dt:.1f} tokens/s "
              f"({', '.join(f'{t:.2f}' for t in dts)} s)")
    ratios = np.array(times[names[1]]) / np.array(times[names[0]])  # each round's: the load changes between rounds
    print(f"streamed, {stream_chunk} tokens per call / one call: {np.median(ratios):.3f}x the time "
          f"(the median of the rounds' {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"kv cache / no cache: {float(np.median(times['no cache']) / np.median(times[names[0]])):.1f}x the tokens/s")


if sample:
    bench_sampling()
else:
    bench_training()
