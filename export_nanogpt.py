"""
Write the latest checkpoint of an out_dir as nanoGPT's ckpt.pt, the dict nanoGPT's train.py saves:
the model's state dict, torch AdamW's state dict over nanoGPT's two parameter groups, model_args,
iter_num, best_val_loss and config. nanoGPT's train.py continues it with --init_from=resume, its
sample.py samples from it:
$ python export_nanogpt.py --out_dir=out-shakespeare-char
$ cd ../nanoGPT && python train.py config/train_shakespeare_char.py --init_from=resume --out_dir=../nanoGPT-jax/out-shakespeare-char
Needs PyTorch; the CPU wheel is enough.
"""
import os
import sys

import interrupts
from configurator import configure, die, quiet_on_closed_pipe

# -----------------------------------------------------------------------------
out_dir = 'out'  # the checkpoint to export
ckpt_dir = ''  # where to write ckpt.pt; '' is out_dir itself, where nanoGPT's train.py --init_from=resume looks
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
quiet_on_closed_pipe()  # its output piped to head, say
interrupts.quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143, at once
# -----------------------------------------------------------------------------
ckpt_dir = ckpt_dir or out_dir
ckpt_path = os.path.join(ckpt_dir, 'ckpt.pt')
if not os.path.isdir(out_dir):
    die(f"out_dir {out_dir!r} does not exist")

import functools

import jax

import checkpoints
import jax_train_utils as tu
from jax_transformer import GPTConfig, param_shapes
from nanogpt_checkpoints import write_nanogpt_checkpoint

tu.configure_devices('cpu', 1, [])  # the arrays only pass through the host
manager = checkpoints.checkpoint_manager(out_dir, read_only=True)
saved_at = checkpoints.checkpoint_time(manager)
if saved_at is not None and os.path.exists(ckpt_path) and os.stat(ckpt_path).st_mtime_ns > saved_at:
    die(f"{ckpt_path} is newer than the checkpoint of {out_dir} (iter {manager.latest_step()}), which would "
        f"replace it: write it elsewhere with --ckpt_dir")
try:
    checkpoint = checkpoints.newest_checkpoint(manager, nanogpt=False)  # this port's own
    config = GPTConfig(**checkpoint.meta['model_args'])
    # the optimizer's settings shape no array: any AdamW restores its state
    tx = tu.adamw(lambda count: 0.0, 0.0, 0.0, 0.0, 0.0, tu.decay_mask(param_shapes(config)))
    abstract_state = jax.eval_shape(functools.partial(tu.create_train_state, config, tx=tx), param_shapes(config))
    on_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = checkpoints.restore_train_state(manager, checkpoint, abstract_state, jax.tree.map(lambda _: on_host,
                                                                                               abstract_state))
    model_args = write_nanogpt_checkpoint(ckpt_path, checkpoint.meta, config, state.params, *state.opt_state)
except ValueError as e:
    die(str(e))
except OSError as e:
    die(f"{e}: choose another --ckpt_dir")
# stamped with the time of the checkpoint it holds: to a resume here it is not newer than that
# checkpoint, which stays the one read (and a later export may replace it); once nanoGPT saves, it is
os.utime(ckpt_path, ns=(saved_at, saved_at))
print(f"wrote iter {checkpoint.meta['iter_num']} of {out_dir} to {ckpt_path}: "
      f"{', '.join(f'{k}={v}' for k, v in model_args.items())}")
if config.gelu_approximate:
    print("note: this model computes the tanh GELU of OpenAI's GPT-2 weights, nanoGPT's the exact GELU: "
          "its logits there differ slightly")
