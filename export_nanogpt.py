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

from configurator import configure, die

# -----------------------------------------------------------------------------
out_dir = 'out'  # the checkpoint to export
ckpt_dir = ''  # where to write ckpt.pt; '' is out_dir itself, where nanoGPT's train.py --init_from=resume looks
# -----------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------
ckpt_dir = ckpt_dir or out_dir
ckpt_path = os.path.join(ckpt_dir, 'ckpt.pt')
if not os.path.isdir(out_dir):
    die(f"out_dir {out_dir!r} does not exist")

import jax_train_utils as tu
from jax_transformer import NANOGPT_MODEL_ARGS, params_to_nanogpt, nanogpt_param_names

tu.configure_devices('cpu', 1, [])  # the arrays only pass through the host
try:
    torch = tu.import_torch("writing nanoGPT's checkpoint")
except ValueError as e:
    die(str(e))
manager = tu.checkpoint_manager(out_dir, read_only=True)
saved_at = tu.checkpoint_time(manager)
if saved_at is not None and os.path.exists(ckpt_path) and os.stat(ckpt_path).st_mtime_ns > saved_at:
    die(f"{ckpt_path} is newer than the checkpoint of {out_dir} (iter {manager.latest_step()}), which would "
        f"replace it: write it elsewhere with --ckpt_dir")
try:
    meta, config, state = tu.restore_state_on_host(manager, out_dir)
except ValueError as e:
    die(str(e))

# the model's state dict, in the order nanoGPT's has it; lm_head.weight is wte's tensor, saved once, as there
weights = params_to_nanogpt(state.params)
model = {name: torch.from_numpy(weights[name]) for name in nanogpt_param_names(config)}
model['lm_head.weight'] = model['transformer.wte.weight']

# a torch AdamW over nanoGPT's two groups, given this port's moments and step count: its state_dict()
# is in the installed torch's own layout, and holds the hyperparameters nanoGPT's resume takes from it
run = {'learning_rate': 6e-4, 'weight_decay': 1e-1, 'beta1': 0.9, 'beta2': 0.95, **meta.get('config', {})}
decay, no_decay = tu.nanogpt_param_groups(config)
optimizer = torch.optim.AdamW([{'params': [model[n] for n in decay], 'weight_decay': run['weight_decay']},
                               {'params': [model[n] for n in no_decay], 'weight_decay': 0.0}],
                              lr=run['learning_rate'], betas=(run['beta1'], run['beta2']))
exp_avg, exp_avg_sq = params_to_nanogpt(state.opt_state.mu), params_to_nanogpt(state.opt_state.nu)
for name in decay + no_decay:
    optimizer.state[model[name]] = {'step': torch.tensor(float(state.opt_state.count)),
                                    'exp_avg': torch.from_numpy(exp_avg[name]),
                                    'exp_avg_sq': torch.from_numpy(exp_avg_sq[name])}

checkpoint = {
    'model': model,
    'optimizer': optimizer.state_dict(),
    'model_args': {k: meta['model_args'][k] for k in NANOGPT_MODEL_ARGS},
    'iter_num': meta['iter_num'],
    'best_val_loss': meta['best_val_loss'],
    'config': meta.get('config', {}),
}
# written whole, then renamed: a failed write leaves an existing ckpt.pt as it was
try:
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(checkpoint, ckpt_path + '.tmp')
    os.replace(ckpt_path + '.tmp', ckpt_path)
except (OSError, RuntimeError) as e:  # torch's file writer raises RuntimeError
    if os.path.exists(ckpt_path + '.tmp'):
        os.remove(ckpt_path + '.tmp')
    die(f"cannot write {ckpt_path} ({type(e).__name__}: {str(e).splitlines()[0]}): choose another --ckpt_dir")
# stamped with the time of the checkpoint it holds: to a resume here it is not newer than that
# checkpoint, which stays the one read (and a later export may replace it); once nanoGPT saves, it is
os.utime(ckpt_path, ns=(saved_at, saved_at))
print(f"wrote iter {meta['iter_num']} of {out_dir} to {ckpt_path}: "
      f"{', '.join(f'{k}={v}' for k, v in checkpoint['model_args'].items())}")
if config.gelu_approximate:
    print("note: this model computes the tanh GELU of OpenAI's GPT-2 weights, nanoGPT's the exact GELU: "
          "its logits there differ slightly")
