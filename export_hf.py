"""
Write the latest checkpoint of an out_dir as a Hugging Face GPT-2 folder (config.json and
model.safetensors), which transformers loads with GPT2LMHeadModel.from_pretrained(hf_dir)
and train_jax.py / sample_jax.py with --init_from=hf_dir.
$ python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-out
"""
import os
import sys
import json

from configurator import configure, die

# -----------------------------------------------------------------------------
out_dir = 'out'  # the checkpoint to export
hf_dir = 'out-hf'  # where to write config.json and model.safetensors
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
if not os.path.isdir(out_dir):
    die(f"out_dir {out_dir!r} does not exist")

import jax
from safetensors.numpy import save_file

import jax_train_utils as tu
from jax_transformer import params_to_hf, hf_config

tu.configure_devices('cpu', 1, [])  # the weights only pass through the host

try:
    checkpoint, config, params = tu.restore_model(out_dir, 'float32',
                                                  jax.sharding.SingleDeviceSharding(jax.devices()[0]))
except ValueError as e:
    die(str(e))

os.makedirs(hf_dir, exist_ok=True)
# transformers 4 refuses a safetensors file whose metadata does not name a framework it knows
save_file(params_to_hf(params, config), os.path.join(hf_dir, 'model.safetensors'), metadata={'format': 'pt'})
with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf_config(config), f, indent=2)
print(f"wrote iter {checkpoint['iter_num']} of {out_dir} to {hf_dir}: {config}")
if not config.bias:
    print("bias=False: the biases of Hugging Face's GPT-2 are written as zeros, which compute the same")
