"""
Sample from a trained model
$ python sample_jax.py --out_dir=out-shakespeare-char
$ python sample_jax.py --init_from=gpt2 --stop='<|endoftext|>' --stream=True --num_samples=1
$ printf 'To be\nor not\n' | python sample_jax.py --out_dir=out-shakespeare-char --interactive=True
"""
import codecs
import os
import sys

import checks
import interrupts
from configurator import configure, die, or_die, quiet_on_closed_pipe

# -----------------------------------------------------------------------------
init_from = 'resume'  # either 'resume' (from an out_dir) or a gpt2 variant (e.g. 'gpt2-xl') or a Hugging Face GPT-2 folder
out_dir = 'out'  # ignored if init_from is not 'resume'
which_checkpoint = 'best'  # of out_dir: 'best', that of the best val loss (nanoGPT's ckpt.pt), or 'latest', a stop's too
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, in the predictions
top_k = 200  # retain only the top_k most likely tokens, clamp others to have 0 probability
top_p = 1.0  # then only the fewest most likely tokens whose probabilities add up to top_p (1.0 = off)
stop = ''  # end each sample before the first of these it writes: several separated by |, or a list ('' = none)
stream = False  # print the samples as they are written, one after the other, instead of all at the end
stream_chunk = 8  # tokens per device call when streaming (fewer: smoother, more calls)
interactive = False  # load once, then sample each line of stdin as the start text, streamed, until its end
seed = 1337
cpu_devices = 0  # on CPU, the JAX devices the cores become: 0 one per core (as num_samples splits), 1 turns it off
device = 'cuda'  # 'cpu' forces the CPU; any other value uses the GPU/TPU when present, else the CPU
dtype = 'auto'  # 'float32' or 'bfloat16' compute ('auto': bfloat16 on GPU/TPU, float32 on CPU)
compile = False  # ignored: sampling is always compiled with XLA, once
compilation_cache = '~/.cache/nanogpt_jax'  # compiled programs kept for the next run of the same shapes; '' turns it off
data_root = ''  # the folder of the checkpoint's dataset, for its meta.pkl; '' the one it was trained with
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:], more_types={'stop': (list, tuple)})  # a config file may list the stops
quiet_on_closed_pipe()  # its output piped to head, say
interrupts.quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143, at once
# -----------------------------------------------------------------------------
if init_from == 'resume' and not os.path.isdir(out_dir):
    die(f"out_dir {out_dir!r} does not exist")
checks.check_sample_config(globals())
stops = [s.encode('utf-8') for s in checks.stop_strings(stop)]
if interactive and sys.stdin is None:  # started with stdin closed (<&-), not merely empty
    die("interactive=True reads the start texts from stdin, which is closed: pipe them in or type them")

import numpy as np
import jax
import tiktoken
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
import jax_train_utils as tu
import memory
from jax_sampling import compiled_generation, generate_stream, printable_end, prompt_buffer, stop_tables

tu.configure_devices(device, cpu_devices, [(1, num_samples)])
tu.use_compilation_cache(compilation_cache)
mesh = tu.make_mesh()

# model: out_dir's newest checkpoint (this port's, or nanoGPT's ckpt.pt), or a given GPT-2 model
checkpoint, config, params = or_die(checkpoints.load_model, init_from, out_dir, mesh, dtype, which_checkpoint)

# look for the meta pickle in case it is available in the dataset folder
load_meta = False
meta_path = None
if init_from == 'resume' and 'config' in checkpoint and 'dataset' in checkpoint['config']:
    # training writes its data_root as an absolute path (older checkpoints: relative to where it ran)
    root = data_root or checkpoint['config'].get('data_root', 'data')
    meta_path = os.path.join(root, checkpoint['config']['dataset'], 'meta.pkl')
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
    pieces = [itos[i].encode('utf-8') for i in range(config.vocab_size)]
else:
    # ok let's assume gpt-2 encodings by default
    print("No meta.pkl found, assuming GPT-2 encodings...")
    stoi = None
    enc = tiktoken.get_encoding("gpt2")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    pieces = [enc.decode_single_token_bytes(i) if i < enc.n_vocab else b'' for i in range(config.vocab_size)]
# a sample's text is the UTF-8 of its tokens' bytes (pieces), printed a whole character at a time (a BPE token can
# end inside one); the device looks for the stop strings in those bytes, so that a batch ends once all have stopped
stop_table = stop_tables(pieces, stops) if stops else None
batch_sharding = NamedSharding(mesh, P('data' if num_samples % jax.device_count() == 0 else None))


fits = set()  # the prompt shapes whose generation is known to fit in the devices' memory


def check_memory(prompt, length):
    """Stop before sampling when the generation's compiled programs cannot fit in the devices' memory."""
    if prompt.shape in fits:
        return
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))  # on every device already
    for program in compiled_generation(params, config, prompt, length, max_new_tokens, temperature, top_k, top_p,
                                       stop_table):
        shortage = memory.memory_shortage(program, 'sampling', params_bytes, "fewer --num_samples at a time")
        if shortage:
            die(shortage, code=1)
    fits.add(prompt.shape)


def sample(start_ids):
    """Print num_samples samples of start_ids, generated as one batch, each as soon as its text is
    final: when streaming, the first as it is written, then each next one from where the batch is
    when the one before ends."""
    # prompt after prompt fills one buffer of block_size tokens, so as to compile once for all
    size = config.block_size if interactive else min(len(start_ids), config.block_size)
    prompt, length = prompt_buffer(start_ids, size)
    prompt = jax.device_put(np.tile(prompt, (num_samples, 1)), batch_sharding)
    check_memory(prompt, length)
    start_bytes = b''.join(pieces[i] for i in start_ids)
    row, printed, utf8 = 0, 0, codecs.getincrementaldecoder('utf-8')('replace')
    for tokens, step, done in generate_stream(params, config, prompt, length, jax.random.key(seed), max_new_tokens,
                                              temperature, top_k, top_p, stop_table,
                                              stream_chunk if stream or interactive else None):
        while row < num_samples:
            text = start_bytes + b''.join(pieces[i] for i in tokens[row, length:length + step])
            end, ended = printable_end(text, stops, len(start_bytes), done[row] or step == max_new_tokens)
            print(utf8.decode(text[printed:end], final=ended), end='\n' if ended else '', flush=True)
            printed = end
            if not ended:
                break
            print('---------------')
            row, printed = row + 1, 0


if interactive:
    while True:
        try:
            text = input('> ' if sys.stdin.isatty() else '')
        except EOFError:  # the end of stdin, even before any line, is the end of the session (exit 0)
            break
        error = checks.start_text_error(text, stoi, meta_path)
        if error:  # say why, and read the next one
            print(f"error: {error}", file=sys.stderr)
        else:
            sample(encode(text))
else:
    # encode the beginning of the prompt
    if start.startswith('FILE:'):
        try:
            with open(start[5:], 'r', encoding='utf-8') as f:
                start = f.read()
        except OSError as e:
            die(f"cannot read the prompt file {start[5:]}: {e.strerror}")
    error = checks.start_text_error(start, stoi, meta_path)
    if error:
        die(error)
    sample(encode(start))
