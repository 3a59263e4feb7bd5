"""
Evaluate a model on HellaSwag's validation set (10,042 examples) in completion style, as
build-nanogpt does: acc picks the ending with the lowest summed loss, acc_norm the lowest loss
per token (see hellaswag.py). build-nanogpt's figures for gpt2 (124M): acc 0.2859, acc_norm 0.2955.
$ python data/hellaswag/prepare.py                    # once: downloads data/hellaswag/hellaswag_val.jsonl
$ python eval_hellaswag.py --init_from=gpt2           # or gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder
$ python eval_hellaswag.py --out_dir=out-shakespeare  # a checkpoint of train_jax.py, or nanoGPT's ckpt.pt
"""
import os
import sys

import checks
import interrupts
from configurator import configure, die, or_die, quiet_on_closed_pipe

# -----------------------------------------------------------------------------
init_from = 'resume'  # either 'resume' (from an out_dir) or a gpt2 variant (e.g. 'gpt2-xl') or a Hugging Face GPT-2 folder
out_dir = 'out'  # ignored if init_from is not 'resume'
which_checkpoint = 'best'  # of out_dir: 'best', that of the best val loss (nanoGPT's ckpt.pt), or 'latest', a stop's too
data_root = 'data'  # the examples are data_root/hellaswag/hellaswag_val.jsonl
batch_size = 8  # examples per step (4 rows each), split over the devices
cpu_devices = 0  # on CPU, the JAX devices the cores become: 0 one per core (as batch_size splits), 1 turns it off
device = 'cuda'  # 'cpu' forces the CPU; any other value uses the GPU/TPU when present, else the CPU
dtype = 'auto'  # 'float32' or 'bfloat16' compute ('auto': bfloat16 on GPU/TPU, float32 on CPU)
compilation_cache = '~/.cache/nanogpt_jax'  # compiled programs kept for the next run of the same shapes; '' turns it off
join_timeout = 300  # seconds for all the processes of a multi-host run to join (as in train_jax.py)
process_timeout = 60  # seconds without a sign of a process after which the others stop (as in train_jax.py)
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
quiet_on_closed_pipe()  # its output piped to head, say
interrupts.quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143, at once
# -----------------------------------------------------------------------------
if init_from == 'resume' and not os.path.isdir(out_dir):
    die(f"out_dir {out_dir!r} does not exist")
checks.at_least(globals(), 'batch_size', 1)
checks.check_dtype(dtype)
examples = checks.hellaswag_examples(data_root)
enc = checks.gpt2_encoding()

import jax

import checkpoints
import hellaswag
import jax_train_utils as tu
import processes

tu.configure_devices(device, cpu_devices, [(1, batch_size)])
processes.init_distributed(join_timeout, process_timeout, out_dir)
master_process = jax.process_index() == 0  # this process prints
tu.use_compilation_cache(compilation_cache)
mesh = tu.make_mesh()

# model: out_dir's newest checkpoint (this port's, or nanoGPT's ckpt.pt), or a GPT-2
_, config, params = or_die(checkpoints.load_model, init_from, out_dir, mesh, dtype, which_checkpoint)
checks.check_hellaswag_vocab(config.vocab_size, enc)

if master_process:
    print(f"scoring {len(examples):,} examples on {jax.device_count()} device(s)")
rows = hellaswag.process_rows(examples, enc, config.block_size)
result = hellaswag.evaluate(params, config, rows, mesh, batch_size)
if master_process:
    print(f"hellaswag: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} over {result['count']:,} examples")
