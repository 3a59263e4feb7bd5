"""
Write the latest checkpoint of an out_dir as a Hugging Face GPT-2 folder (config.json and
model.safetensors), which transformers loads with GPT2LMHeadModel.from_pretrained(hf_dir)
and train_jax.py / sample_jax.py with --init_from=hf_dir.
$ python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-out
"""
import os
import sys

import checks
import interrupts
from configurator import configure, die, or_die, quiet_on_closed_pipe

# -----------------------------------------------------------------------------
out_dir = 'out'  # the checkpoint to export
which_checkpoint = 'best'  # of out_dir: 'best', that of the best val loss (nanoGPT's ckpt.pt), or 'latest', a stop's too
hf_dir = 'out-hf'  # where to write config.json and model.safetensors: a new or empty folder
overwrite = False  # if True, an existing Hugging Face folder at hf_dir is replaced, whole
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
quiet_on_closed_pipe()  # its output piped to head, say
interrupts.quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143, at once
# -----------------------------------------------------------------------------
if not os.path.isdir(out_dir):
    die(f"out_dir {out_dir!r} does not exist")
checks.check_hf_dir(hf_dir, overwrite)

import jax

import checkpoints
import jax_train_utils as tu
from gpt2_weights import save_pretrained

tu.configure_devices('cpu', 1, [])  # the weights only pass through the host

# this port's latest checkpoint, or nanoGPT's ckpt.pt when that is newer
host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
checkpoint, config, params = or_die(checkpoints.load_params, out_dir, host, which_checkpoint)
try:
    save_pretrained(params, config, hf_dir)
except OSError as e:
    die(f"cannot write {hf_dir!r}: {e.strerror or e}: choose another --hf_dir", code=1)
print(f"wrote iter {checkpoint['iter_num']} of {out_dir} to {hf_dir}: {config}")
if not config.bias:
    print("bias=False: the biases of Hugging Face's GPT-2 are written as zeros, which compute the same")
