"""
nanoGPT's own checkpoints, both ways: the state dict of its model.py's GPT, its AdamW's two
parameter groups, and the ckpt.pt its train.py saves in out_dir. checkpoints.py reads a ckpt.pt
when it is the newest checkpoint of an out_dir; export_nanogpt.py writes one. torch is imported
on these paths only.

nanoGPT's parameter names are Hugging Face's (gpt2_weights.hf_name), but its c_attn, c_fc and
c_proj are nn.Linear, whose weights are (out, in): the transpose of a Flax Dense kernel.
"""

import os

import numpy as np

from jax_transformer import GPTConfig, param_shapes, param_paths
from gpt2_weights import hf_name, params_from_hf

NANOGPT_CHECKPOINT = 'ckpt.pt'  # in out_dir, as nanoGPT's train.py names it
NANOGPT_MODEL_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')


def import_torch(why):
    """torch, or ValueError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"{why} needs PyTorch: pip install torch (the CPU wheel is enough: pip install torch "
                         f"--index-url https://download.pytorch.org/whl/cpu)") from None
    return torch


# -----------------------------------------------------------------------------
# the model's state dict and AdamW's groups

def nanogpt_param_names(config):
    """The names of nanoGPT's model.named_parameters() for config, in its order, which its
    optimizer's parameter ids follow. lm_head.weight is not one: it is transformer.wte.weight."""
    block = ['ln_1.weight', 'ln_1.bias', 'attn.c_attn.weight', 'attn.c_attn.bias', 'attn.c_proj.weight',
             'attn.c_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.c_fc.weight', 'mlp.c_fc.bias',
             'mlp.c_proj.weight', 'mlp.c_proj.bias']
    names = ['transformer.wte.weight', 'transformer.wpe.weight']
    names += [f'transformer.h.{i}.{name}' for i in range(config.n_layer) for name in block]
    names += ['transformer.ln_f.weight', 'transformer.ln_f.bias']
    return [n for n in names if config.bias or not n.endswith('.bias')]


def nanogpt_param_groups(config):
    """The names of the parameters in the two groups of nanoGPT's AdamW (its configure_optimizers):
    those decayed (2 or more dims), then the others, each in named_parameters() order."""
    ndim = {hf_name(path): len(shape.shape) for path, shape in param_paths(param_shapes(config))}
    names = nanogpt_param_names(config)
    return [n for n in names if ndim[n] >= 2], [n for n in names if ndim[n] < 2]


def params_from_nanogpt(state_dict, config):
    """Flax params for config from nanoGPT's model.state_dict() (NumPy arrays, a compiled model's
    `_orig_mod.` prefix removed), or from its AdamW moments under the same names. lm_head.weight
    (tied to wte) and the causal mask buffers of models without flash attention (attn.bias) are
    not parameters here. ValueError when the tensors are not those of config."""
    expected = {hf_name(path) for path, _ in param_paths(param_shapes(config))}
    other = [k for k in state_dict if k not in expected and k != 'lm_head.weight' and not k.endswith('.attn.bias')]
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ValueError(f"it has no {missing[0]}")
    if other:
        raise ValueError(f"it has {other[0]}, which the model has not")
    transpose = lambda name: name.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight'))
    return params_from_hf(lambda name: state_dict[name].T if transpose(name) else state_dict[name], config)


def params_to_nanogpt(params):
    """nanoGPT's named parameters for params, {name: float32 NumPy array}: the inverse of
    params_from_nanogpt. Its model.state_dict() also holds lm_head.weight, the same array as
    transformer.wte.weight; its AdamW moments are in this layout too."""
    state = {}
    for path, w in param_paths(params):
        w = np.array(w, dtype=np.float32)  # a writable copy: torch.from_numpy warns of a read-only array
        state[hf_name(path)] = np.ascontiguousarray(w.T) if path[-1] == 'kernel' else w
    return state


def adamw_from_nanogpt(optimizer, config):
    """(count, mu, nu) of nanoGPT's torch AdamW, from its state_dict() with NumPy arrays: the
    parameter ids of its two groups (nanogpt_param_groups) name each one's exp_avg, exp_avg_sq and
    step. torch's step becomes the count, which the learning rate schedule reads, so the next
    update is the one torch would make. ValueError when it is not such an optimizer."""
    decay, no_decay = nanogpt_param_groups(config)
    not_nanogpts = f"its optimizer is not nanoGPT's AdamW over {len(decay)} decayed and {len(no_decay)} other tensors"
    try:
        ids = [list(group['params']) for group in optimizer['param_groups']]
        if [len(g) for g in ids] != [len(decay), len(no_decay)]:
            raise ValueError(f"{not_nanogpts}: its groups hold {' and '.join(str(len(g)) for g in ids)}")
        state = dict(zip(decay + no_decay, (optimizer['state'][i] for i in ids[0] + ids[1])))
        steps = {float(s['step']) for s in state.values()}
        mu, nu = ({name: s[k] for name, s in state.items()} for k in ('exp_avg', 'exp_avg_sq'))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{not_nanogpts} ({type(e).__name__}: {e})") from None
    if len(steps) != 1:
        raise ValueError(f"its optimizer stepped its parameters {min(steps):.0f} to {max(steps):.0f} times")
    try:
        mu, nu = params_from_nanogpt(mu, config), params_from_nanogpt(nu, config)
    except ValueError as e:
        raise ValueError(f"its optimizer's moments are not the model's: {e}") from None
    return np.int32(steps.pop()), mu, nu


# -----------------------------------------------------------------------------
# ckpt.pt

def read_nanogpt_checkpoint(path, with_optimizer=True):
    """nanoGPT's ckpt.pt, the dict its train.py saves, as (meta, params, optimizer): meta as this
    port's checkpoints hold it (model_args, iter_num, best_val_loss, config), the params of its
    model's state dict (a compiled model's, whose names begin with `_orig_mod.`, too) and its
    AdamW's (count, mu, nu) (None without with_optimizer). nanoGPT's model computes the exact GELU.
    ValueError, with a one-line message, when torch is missing or the file is not such a
    checkpoint; nothing is written."""
    torch = import_torch(f"reading nanoGPT's checkpoint {path}")
    try:
        # mmap: each tensor is read when it is converted, so a large checkpoint is never all in memory
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # a damaged zip or pickle raises many kinds
        raise ValueError(f"cannot read {path} ({type(e).__name__}): it is cut short or damaged, or was not "
                         f"written by torch.save") from None
    not_nanogpts = f"{path} is not a checkpoint of nanoGPT's train.py"
    missing = [k for k in ('model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss')
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{not_nanogpts}: it has no {', '.join(missing)}")
    args = ckpt['model_args']
    sizes = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')
    if not (isinstance(args, dict) and all(k in args for k in NANOGPT_MODEL_ARGS)
            and all(isinstance(args[k], int) and args[k] > 0 for k in sizes)
            and args['n_embd'] % args['n_head'] == 0 and isinstance(args['bias'], bool)):
        raise ValueError(f"{not_nanogpts}: its model_args {args!r} are not those of a GPT")
    model_args = {**{k: args[k] for k in NANOGPT_MODEL_ARGS}, 'gelu_approximate': False}
    config = GPTConfig(**model_args)
    to_numpy = lambda tensors: {k: t.detach().to(torch.float32).numpy() for k, t in tensors.items()}
    try:
        meta = {'model_args': model_args, 'iter_num': int(ckpt['iter_num']),
                'best_val_loss': float(ckpt['best_val_loss']), 'config': dict(ckpt.get('config', {}))}
        model = {k.removeprefix('_orig_mod.'): t for k, t in to_numpy(ckpt['model']).items()}
        optimizer = ckpt['optimizer']
        if with_optimizer:
            optimizer = dict(optimizer, state={i: to_numpy(s) for i, s in optimizer['state'].items()})
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # not numbers and tensors where nanoGPT has them
        raise ValueError(f"{not_nanogpts} ({type(e).__name__}: {e})") from None
    try:
        params = params_from_nanogpt(model, config)
        optimizer = adamw_from_nanogpt(optimizer, config) if with_optimizer else None
    except ValueError as e:
        shape = ', '.join(f'{k}={args[k]}' for k in NANOGPT_MODEL_ARGS if k != 'dropout')
        raise ValueError(f"{path} does not fit its model_args ({shape}): {e}") from None
    return meta, params, optimizer


def write_nanogpt_checkpoint(path, meta, config, params, count, mu, nu):
    """Write the dict nanoGPT's train.py saves as ckpt.pt: the model's state dict, the state dict of
    a torch AdamW over nanoGPT's two groups holding the moments mu, nu and step count, and meta's
    model_args, iter_num, best_val_loss and config. The file is written whole, then renamed: a
    failed write leaves an existing ckpt.pt as it was. Returns the model_args written. ValueError
    when torch is missing, OSError when the file cannot be written."""
    torch = import_torch("writing nanoGPT's checkpoint")
    # the model's state dict, in the order nanoGPT's has it; lm_head.weight is wte's tensor, saved once, as there
    weights = params_to_nanogpt(params)
    model = {name: torch.from_numpy(weights[name]) for name in nanogpt_param_names(config)}
    model['lm_head.weight'] = model['transformer.wte.weight']
    # a torch AdamW given this port's moments and step count: its state_dict() is in the installed torch's
    # own layout, and holds the hyperparameters that nanoGPT's resume takes from it
    hyperparameters = {'learning_rate': 6e-4, 'weight_decay': 1e-1, 'beta1': 0.9, 'beta2': 0.95,
                       **meta.get('config', {})}
    decay, no_decay = nanogpt_param_groups(config)
    optimizer = torch.optim.AdamW(
        [{'params': [model[n] for n in decay], 'weight_decay': hyperparameters['weight_decay']},
         {'params': [model[n] for n in no_decay], 'weight_decay': 0.0}],
        lr=hyperparameters['learning_rate'], betas=(hyperparameters['beta1'], hyperparameters['beta2']))
    exp_avg, exp_avg_sq = params_to_nanogpt(mu), params_to_nanogpt(nu)
    for name in decay + no_decay:
        optimizer.state[model[name]] = {'step': torch.tensor(float(count)), 'exp_avg': torch.from_numpy(exp_avg[name]),
                                        'exp_avg_sq': torch.from_numpy(exp_avg_sq[name])}
    checkpoint = {
        'model': model,
        'optimizer': optimizer.state_dict(),
        'model_args': {k: meta['model_args'][k] for k in NANOGPT_MODEL_ARGS},
        'iter_num': meta['iter_num'],
        'best_val_loss': meta['best_val_loss'],
        'config': meta.get('config', {}),
    }
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        torch.save(checkpoint, path + '.tmp')
        os.replace(path + '.tmp', path)
    except (OSError, RuntimeError) as e:  # torch's file writer raises RuntimeError
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        raise OSError(f"cannot write {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return checkpoint['model_args']
