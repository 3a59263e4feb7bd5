"""
Sample from a trained model
$ python sample_jax.py --out_dir=out-shakespeare-char
"""
import os
import sys

import checks
from configurator import configure, die

# -----------------------------------------------------------------------------
init_from = 'resume'  # either 'resume' (from an out_dir) or a gpt2 variant (e.g. 'gpt2-xl') or a Hugging Face GPT-2 folder
out_dir = 'out'  # ignored if init_from is not 'resume'
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, in the predictions
top_k = 200  # retain only the top_k most likely tokens, clamp others to have 0 probability
top_p = 1.0  # then only the fewest most likely tokens whose probabilities add up to top_p (1.0 = off)
seed = 1337
cpu_devices = 0  # on CPU, the JAX devices the cores become: 0 one per core (as num_samples splits), 1 turns it off
device = 'cuda'  # 'cpu' forces the CPU; any other value uses the GPU/TPU when present, else the CPU
dtype = 'auto'  # 'float32' or 'bfloat16' compute ('auto': bfloat16 on GPU/TPU, float32 on CPU)
compile = False  # ignored: sampling is always compiled with XLA, once
compilation_cache = '~/.cache/nanogpt_jax'  # compiled programs kept for the next run of the same shapes; '' turns it off
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
if init_from == 'resume' and not os.path.isdir(out_dir):
    die(f"out_dir {out_dir!r} does not exist")
checks.check_sample_config(globals())

import dataclasses

import jax
import jax.numpy as jnp
import tiktoken
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
import jax_train_utils as tu
from jax_transformer import generate

tu.configure_devices(device, cpu_devices, [(1, num_samples)])
tu.use_compilation_cache(compilation_cache)
try:
    dtype = tu.resolve_dtype(dtype)
except ValueError as e:
    die(str(e))

mesh = tu.make_mesh()
replicated = NamedSharding(mesh, P())

# model
try:
    # out_dir's newest checkpoint (this port's, or nanoGPT's ckpt.pt), or a given GPT-2 model
    checkpoint, config, params = checkpoints.load_model(init_from, out_dir, replicated)
except ValueError as e:
    die(str(e))
config = dataclasses.replace(config, dropout=0.0, dtype=dtype)

# look for the meta pickle in case it is available in the dataset folder
load_meta = False
meta_path = None
if init_from == 'resume' and 'config' in checkpoint and 'dataset' in checkpoint['config']:
    meta_path = os.path.join(checkpoint['config'].get('data_root', 'data'), checkpoint['config']['dataset'], 'meta.pkl')
    load_meta = os.path.exists(meta_path)
if not load_meta and config.vocab_size < 50257:  # GPT-2's encoding would give it ids it does not have
    die(f"the model has a vocab_size of {config.vocab_size}, too small for the GPT-2 encoding: " +
        (f"it needs the meta.pkl of its dataset, {meta_path}, which is missing" if init_from == 'resume' else
         "sample its checkpoint with --init_from=resume"))
if load_meta:
    print(f"Loading meta from {meta_path}...")
    meta = checks.read_meta(meta_path, ['vocab_size', 'stoi', 'itos'])
    checks.check_vocab_size(meta_path, meta['vocab_size'], config.vocab_size,
                            "the dataset was prepared again since the model was trained")
    stoi, itos = meta['stoi'], meta['itos']
    encode = lambda s: [stoi[c] for c in s]
    decode = lambda l: ''.join([itos[i] for i in l])
else:
    # ok let's assume gpt-2 encodings by default
    print("No meta.pkl found, assuming GPT-2 encodings...")
    enc = tiktoken.get_encoding("gpt2")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    decode = lambda l: enc.decode([i for i in l if i < enc.n_vocab])  # the padded vocab's extra ids are not text

# encode the beginning of the prompt
if start.startswith('FILE:'):
    try:
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        die(f"cannot read the prompt file {start[5:]}: {e.strerror}")
if load_meta:
    checks.check_start_chars(start, stoi, meta_path)
start_ids = encode(start)
if not start_ids:
    die("the start text is empty")

# run generation: all samples as one batch, compiled once, split over the devices when they divide it
x = jnp.tile(jnp.array(start_ids, dtype=jnp.int32)[None, :], (num_samples, 1))
x = jax.device_put(x, NamedSharding(mesh, P('data' if num_samples % jax.device_count() == 0 else None)))
y = generate(params, config, x, jax.random.key(seed), max_new_tokens, temperature, top_k, top_p)
for row in jax.device_get(y):
    print(decode(row.tolist()))
    print('---------------')
