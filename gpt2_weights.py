"""
OpenAI's GPT-2 weights in Hugging Face's layout, both ways: from the hub ('gpt2', 'gpt2-medium',
'gpt2-large', 'gpt2-xl') or a folder that transformers' save_pretrained wrote, and back to such a
folder (export_hf.py). No PyTorch is needed: the safetensors files are read one tensor at a time.

    config, params = from_pretrained('gpt2')         # then dataclasses.replace(config, dropout=0.1, ...)
    save_pretrained(params, config, 'hf-out')         # GPT2LMHeadModel.from_pretrained('hf-out') loads it
"""

import contextlib
import json
import os
import shutil

import numpy as np

from jax_transformer import GPTConfig, param_shapes, param_paths

# OpenAI's GPT-2 models: n_layer, n_head, n_embd; all have GPT-2's vocabulary, 1024 positions, biases
# and the tanh GELU
GPT2_SHAPES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
               'gpt2-xl': (48, 25, 1600)}
GPT2_MODELS = tuple(GPT2_SHAPES)
# transformers' names of the GELUs: True for the tanh approximation OpenAI's GPT-2 was trained with
HF_GELUS = {'gelu': False, 'gelu_python': False, 'gelu_new': True, 'gelu_pytorch_tanh': True, 'gelu_fast': True}


def hf_name(path):
    """Flax param path ('h_0', 'attn', 'c_attn', 'kernel') -> 'transformer.h.0.attn.c_attn.weight'.
    HF's GPT-2 stores c_attn, c_fc, c_proj as Conv1D weights (in, out): the same layout as a
    Flax Dense kernel, so no transpose is needed."""
    *module, leaf = path
    if module[0].startswith('h_'):
        module = ['h', module[0][2:]] + list(module[1:])
    leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}[leaf]
    return '.'.join(['transformer'] + module + [leaf])


def params_from_hf(get_tensor, config):
    """Flax params (float32 NumPy arrays) for `config` from a GPT-2 checkpoint in HF's layout;
    get_tensor(name) returns one array, so tensors can be streamed one at a time from a file."""
    params = {}
    for path, shape in param_paths(param_shapes(config)):
        w = np.asarray(get_tensor(hf_name(path)), dtype=np.float32)
        if w.shape != shape.shape:
            raise ValueError(f"{hf_name(path)} has shape {w.shape}, but the model's is {shape.shape}")
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = w
    return params


def params_to_hf(params, config):
    """The state dict of transformers' GPT2LMHeadModel for params, float32 NumPy arrays: the inverse
    of params_from_hf. lm_head.weight is left out, as save_pretrained does: it is tied to
    transformer.wte.weight. HF's GPT-2 always has biases: a bias=False model gets zeros there,
    which compute the same."""
    state = {}
    for path, w in param_paths(params):
        state[hf_name(path)] = np.asarray(w, dtype=np.float32)
        if not config.bias and path[-1] in ('kernel', 'scale'):
            state[hf_name(path[:-1] + ('bias',))] = np.zeros(w.shape[-1], np.float32)
    return state


def gpt_config_from_hf(hf):
    """The GPTConfig of a transformers GPT2Config, given as the dict of its config.json.
    ValueError for a variant of GPT-2 that this model does not compute."""
    if hf.get('model_type') != 'gpt2':
        raise ValueError(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    activation = hf.get('activation_function', 'gelu_new')
    if activation not in HF_GELUS:
        raise ValueError(f"activation_function {activation!r} is not one of {', '.join(HF_GELUS)}")
    n_embd = hf.get('n_embd', 768)
    # GPT-2's options, at the values GPT computes with (transformers' defaults)
    fixed = {'layer_norm_epsilon': 1e-5, 'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
             'add_cross_attention': False, 'tie_word_embeddings': True}
    other = [k for k, v in fixed.items() if hf.get(k, v) != v]
    other += ['n_inner'] if hf.get('n_inner') not in (None, 4 * n_embd) else []
    if other:
        raise ValueError(f"this GPT-2 has settings the model here does not support: {', '.join(other)}")
    return GPTConfig(block_size=hf.get('n_positions', 1024), vocab_size=hf.get('vocab_size', 50257),
                     n_layer=hf.get('n_layer', 12), n_head=hf.get('n_head', 12), n_embd=n_embd,
                     bias=True, gelu_approximate=HF_GELUS[activation])


def hf_config(config):
    """config.json of transformers' GPT2LMHeadModel for config: the inverse of gpt_config_from_hf."""
    eot = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocab has it
    return {
        'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'],
        'vocab_size': config.vocab_size, 'n_positions': config.block_size, 'n_embd': config.n_embd,
        'n_layer': config.n_layer, 'n_head': config.n_head, 'n_inner': None,
        'activation_function': 'gelu_new' if config.gelu_approximate else 'gelu',
        'resid_pdrop': config.dropout, 'embd_pdrop': config.dropout, 'attn_pdrop': config.dropout,
        'layer_norm_epsilon': 1e-5, 'initializer_range': 0.02, 'tie_word_embeddings': True,
        'bos_token_id': eot, 'eos_token_id': eot, 'dtype': 'float32',
    }


def hf_files(name_or_path):
    """Paths of the config.json and the safetensors file(s) of one of GPT2_MODELS, downloaded
    from the Hugging Face hub (or found in its cache), or of a folder written by save_pretrained."""
    if name_or_path in GPT2_MODELS:
        from huggingface_hub import hf_hub_download
        repo = f'openai-community/{name_or_path}'
        try:
            return hf_hub_download(repo, 'config.json'), [hf_hub_download(repo, 'model.safetensors')]
        except OSError as e:  # no network and not in the cache, or the hub refused
            raise ValueError(f"cannot get {repo} from the Hugging Face hub ({type(e).__name__}): "
                             f"fill its cache while online, or pass a local folder") from None
    if not os.path.isdir(name_or_path):
        raise ValueError(f"{name_or_path!r} is neither one of {', '.join(GPT2_MODELS)} nor a folder")
    config_path = os.path.join(name_or_path, 'config.json')
    weights = os.path.join(name_or_path, 'model.safetensors')
    index = weights + '.index.json'  # a large model saved in shards
    if not os.path.isfile(config_path):
        raise ValueError(f"{name_or_path} has no config.json: not a Hugging Face GPT-2 folder")
    if os.path.isfile(weights):
        return config_path, [weights]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        return config_path, [os.path.join(name_or_path, shard) for shard in shards]
    raise ValueError(f"{name_or_path} has no model.safetensors")


def safetensors_reader(paths, stack):
    """get_tensor(name) for params_from_hf, reading one tensor at a time from the safetensors
    files `paths`, which stay open in the ExitStack `stack`. OpenAI's files on the hub name the
    tensors of GPT2Model ('h.0.attn.c_attn.weight'), save_pretrained those of GPT2LMHeadModel
    ('transformer.h.0.attn.c_attn.weight'): both work."""
    from safetensors import safe_open
    files = {}
    for path in paths:
        f = stack.enter_context(safe_open(path, framework='numpy'))
        files.update(dict.fromkeys(f.keys(), f))
    prefix = 'transformer.' if 'transformer.wte.weight' in files else ''

    def get_tensor(name):
        key = prefix + name.removeprefix('transformer.')
        if key not in files:
            raise ValueError(f"{', '.join(paths)} has no tensor {key}: not a GPT-2 of its config.json")
        return files[key].get_tensor(key)
    return get_tensor


def read_hf_config(config_path):
    """The GPTConfig of a Hugging Face GPT-2 config.json; ValueError with a one-line message."""
    try:
        with open(config_path) as f:
            return gpt_config_from_hf(json.load(f))
    except (OSError, ValueError) as e:  # unreadable, not JSON, or not a GPT-2
        raise ValueError(f"{config_path}: {e}") from None


def pretrained_config(name_or_path):
    """The GPTConfig of what from_pretrained(name_or_path) loads, without its weights or a network:
    one of GPT2_MODELS, or the config.json of a Hugging Face GPT-2 folder."""
    if name_or_path in GPT2_SHAPES:
        n_layer, n_head, n_embd = GPT2_SHAPES[name_or_path]
        return GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         bias=True, gelu_approximate=True)
    return read_hf_config(os.path.join(name_or_path, 'config.json'))


def from_pretrained(name_or_path):
    """(GPTConfig, params) of OpenAI's GPT-2: 'gpt2', 'gpt2-medium', 'gpt2-large' or 'gpt2-xl'
    from the Hugging Face hub (its cache and HF_HUB_OFFLINE work as usual), or a GPT-2 folder as
    transformers' save_pretrained writes it (config.json, model.safetensors). The tensors are read
    one at a time, so this needs little more host memory than the model itself. The config has
    dropout 0.0 and computes in float32: set others with dataclasses.replace. ValueError, with a
    one-line message, when there is no such model or it is not a GPT-2 this model can compute."""
    print(f"loading weights from pretrained gpt: {name_or_path}")
    config_path, weight_paths = hf_files(name_or_path)
    config = read_hf_config(config_path)
    if name_or_path in GPT2_MODELS:
        print(f"forcing vocab_size={config.vocab_size}, block_size={config.block_size}, bias=True")
    with contextlib.ExitStack() as stack:
        params = params_from_hf(safetensors_reader(weight_paths, stack), config)
    return config, params


def save_pretrained(params, config, hf_dir):
    """Write params as a Hugging Face GPT-2 folder, config.json and model.safetensors, complete or
    not at all: into a new folder beside hf_dir, which then takes its place (a folder there is
    replaced whole, none of its files left behind)."""
    from safetensors.numpy import save_file
    path = os.path.abspath(hf_dir)
    new, old = path + '.tmp', path + '.old'
    for folder in (new, old):
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(new)
    # transformers 4 refuses a safetensors file whose metadata does not name a framework it knows
    save_file(params_to_hf(params, config), os.path.join(new, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(new, 'config.json'), 'w') as f:
        json.dump(hf_config(config), f, indent=2)
    if os.path.isdir(path) and os.listdir(path):
        os.rename(path, old)
    os.replace(new, path)  # over an empty folder too
    shutil.rmtree(old, ignore_errors=True)
