"""
Checks of what the scripts are given: config values, data files, the out_dir, a checkpoint to
resume, the prompt and the GPT-2 tokenizer, made before any work starts. Each stops the script
with configurator.die: a one-line message that says what is wrong and what to do, and exit code 2.
Plain Python, NumPy and tiktoken, so that most mistakes are reported before JAX is even imported.
"""

import difflib
import json
import os
import pickle
import re
import tempfile

import numpy as np
import tiktoken

from configurator import die


def at_least(config, key, low):
    if config[key] < low:
        die(f"{key}={config[key]} is not allowed: {key} must be {low} or more")


def in_unit_interval(config, key):
    if not 0.0 <= config[key] < 1.0:
        die(f"{key}={config[key]} is not allowed: {key} must be at least 0 and below 1")


def check_dtype(dtype):
    """dtype is a compute dtype the scripts run in."""
    if dtype == 'float16':
        die("dtype 'float16' needs loss scaling, which this port does not do: use --dtype=bfloat16 (GPU/TPU) or "
            "--dtype=float32")
    if dtype not in ('float32', 'bfloat16', 'auto'):
        die(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16' or 'auto'")


def check_train_config(config):
    """The values of train_jax.py's config (a dict of its keys) that no run could use."""
    for key in ('batch_size', 'block_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval',
                'eval_iters', 'join_timeout', 'process_timeout'):
        at_least(config, key, 1)
    for key in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'learning_rate', 'min_lr', 'weight_decay',
                'grad_clip', 'hellaswag_interval', 'seed'):
        at_least(config, key, 0)
    for key in ('dropout', 'beta1', 'beta2'):
        in_unit_interval(config, key)
    check_dtype(config['dtype'])
    if config['attention'] not in ('auto', 'dense', 'blockwise', 'cudnn', 'flash'):
        die(f"attention={config['attention']!r} is not allowed: use 'auto', 'dense', 'blockwise', 'cudnn' (NVIDIA) "
            f"or 'flash' (TPU)")
    if config['init_from'] == 'scratch':  # a resumed or pretrained model has the shape of its checkpoint
        for key in ('n_layer', 'n_head', 'n_embd'):
            at_least(config, key, 1)
        if config['n_embd'] % config['n_head'] != 0:
            die(f"n_embd={config['n_embd']} is not divisible by n_head={config['n_head']}: "
                f"every head gets n_embd / n_head channels, choose n_embd a multiple of n_head")


def check_sample_config(config):
    """The values of sample_jax.py's config that no sampling could use."""
    check_dtype(config['dtype'])
    for key in ('num_samples', 'max_new_tokens', 'top_k'):
        at_least(config, key, 1)
    if not 0.0 < config['top_p'] <= 1.0:
        die(f"top_p={config['top_p']} is not allowed: top_p is a probability, above 0 and at most 1 (1.0 turns it off)")
    if config['temperature'] <= 0:
        die(f"temperature={config['temperature']} is not allowed: temperature must be above 0 "
            f"(below 1 is less random, e.g. 0.01 is nearly greedy)")


def read_text(path):
    """The text of the file at path ('' for no path), or stop saying why it cannot be read."""
    if not path:
        return ''
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read {path}: {getattr(e, 'strerror', None) or e}")


def check_hf_dir(hf_dir, overwrite):
    """hf_dir can take a Hugging Face folder: it is new, or empty, or (with overwrite) one already,
    which a new one replaces whole; it can be made, and takes new files."""
    if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
        die(f"hf_dir {hf_dir!r} is a file: choose another --hf_dir")
    if os.path.isdir(hf_dir) and os.listdir(hf_dir):
        if not os.path.exists(os.path.join(hf_dir, 'config.json')):
            die(f"hf_dir {hf_dir!r} holds other files: choose another --hf_dir (a new or empty folder)")
        if not overwrite:
            die(f"hf_dir {hf_dir!r} already holds a Hugging Face model: choose another --hf_dir, or replace it "
                f"with --overwrite=True")
    check_out_dir(hf_dir, 'hf_dir')


def check_out_dir(out_dir, key='out_dir'):
    """out_dir exists, or can be made, and takes new files: found out now rather than at the
    first checkpoint, an hour into training."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        die(f"cannot write to {key} {out_dir!r}: {e.strerror}: choose another --{key}")


# -----------------------------------------------------------------------------
# data

def gpt2_encoding():
    """tiktoken's GPT-2 BPE. tiktoken reads its files from its cache or downloads them; with
    neither, stop saying where it looked."""
    try:
        return tiktoken.get_encoding('gpt2')
    except (OSError, ValueError) as e:  # no network (requests' errors are OSErrors), or a damaged download
        cache = os.environ.get('TIKTOKEN_CACHE_DIR', os.environ.get(
            'DATA_GYM_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'data-gym-cache')))
        die(f"cannot load the GPT-2 tokenizer: tiktoken finds its files neither in its cache {cache} nor online "
            f"({type(e).__name__}); offline, set TIKTOKEN_CACHE_DIR to a folder that holds them")


def dataset_missing(data_root, dataset, prepare):
    """Stop for a dataset whose train.bin is not in data_root and that cannot be prepared here:
    say how to prepare it, or which dataset was probably meant."""
    train_bin = os.path.join(data_root, dataset, 'train.bin')
    if os.path.exists(prepare):
        die(f"{train_bin} not found: prepare it first with `python {prepare}`")
    names = [d for d in os.listdir(data_root) if os.path.isdir(os.path.join(data_root, d))] \
        if os.path.isdir(data_root) else []
    close = difflib.get_close_matches(dataset, names, n=1)
    hint = f"did you mean --dataset={close[0]}?" if close else "check --dataset and --data_root"
    die(f"{train_bin} not found: there is no dataset {dataset!r} in data_root {data_root!r}: {hint}")


def check_token_file(path, block_size):
    """path is a whole number of uint16 tokens, more than block_size of them."""
    if not os.path.exists(path):
        die(f"{path} not found: prepare the dataset again with its prepare.py")
    size = os.path.getsize(path)
    if size % 2 != 0:
        die(f"{path} is {size:,} bytes, not a whole number of uint16 tokens: the file is damaged "
            f"or was not written by a prepare.py; prepare the dataset again")
    if size // 2 <= block_size:
        die(f"{path} holds {size // 2:,} tokens, too few for a block of block_size={block_size} "
            f"and its next token: use a smaller --block_size or more data")


def check_token_ids(path, vocab_size, vocab_from, chunk=1 << 24, max_chunks=16):
    """Every token id of path is below vocab_size (which comes from vocab_from). A file of more
    than max_chunks chunks (256M tokens with the defaults) is checked on max_chunks chunks
    spread over it, to read at most 512 MB: data made with another tokenizer shows it everywhere."""
    data = np.memmap(path, dtype=np.uint16, mode='r')
    n_chunks = -(-len(data) // chunk)
    for c in np.unique(np.linspace(0, n_chunks - 1, min(n_chunks, max_chunks)).round().astype(int)):
        top = int(data[c * chunk:(c + 1) * chunk].max())
        if top >= vocab_size:
            die(f"{path} holds token id {top}, but vocab_size is {vocab_size} ({vocab_from}): the "
                f"data was made with another vocabulary; prepare it again or choose the matching --dataset")


class CodeInPickle(pickle.UnpicklingError):
    """A pickle that names a class or function to call: one that can run any code."""


class DataUnpickler(pickle.Unpickler):
    """Builds what pickle writes without naming a class or function, all a prepare.py's meta.pkl
    holds (nanoGPT's too): dicts, lists, tuples, sets, strings, bytes, numbers, booleans, None.
    Anything else, an object whose unpickling would call os.system or eval included, is refused
    before it is built."""

    def find_class(self, module, name):
        raise CodeInPickle(f"{module}.{name}")


# what the keys of a meta.pkl hold, for the scripts that read them
META_TYPES = {'vocab_size': 'an int', 'stoi': 'a dict of characters to ints', 'itos': 'a dict of ints to characters'}
META_CHECKS = {'vocab_size': lambda v: type(v) is int and v > 0,
               'stoi': lambda v: isinstance(v, dict) and all(type(c) is str and type(i) is int for c, i in v.items()),
               'itos': lambda v: isinstance(v, dict) and all(type(i) is int and type(c) is str for i, c in v.items())}


def read_meta(path, keys):
    """The dict a prepare.py wrote to a dataset's meta.pkl, which must hold keys (of META_TYPES),
    read as data alone (DataUnpickler): a dataset shared by others cannot run code here."""
    try:
        with open(path, 'rb') as f:
            meta = DataUnpickler(f).load()
    except CodeInPickle as e:
        die(f"{path} is not data alone: reading it would call {e}, which can run any code, so it was not read; "
            f"prepare the dataset again, or ask whoever gave it to you")
    except Exception as e:  # unpickling a damaged file can raise almost anything
        die(f"cannot read {path} ({type(e).__name__}): prepare the dataset again")
    missing = [k for k in keys if not isinstance(meta, dict) or k not in meta]
    if missing:
        die(f"{path} has no {', '.join(missing)}: it was not written by a prepare.py of this "
            f"project; prepare the dataset again")
    wrong = [k for k in keys if not META_CHECKS[k](meta[k])]
    if wrong:
        die(f"{path}: {wrong[0]} is not {META_TYPES[wrong[0]]}: it was not written by a prepare.py of this project; "
            f"prepare the dataset again")
    return meta


def dataset_vocab_size(data_dir):
    """The vocab_size of a dataset's meta.pkl (a character-level dataset), None when it has none."""
    meta_path = os.path.join(data_dir, 'meta.pkl')
    return read_meta(meta_path, ['vocab_size'])['vocab_size'] if os.path.exists(meta_path) else None


def is_hellaswag_example(example):
    """Whether example, read from JSON, is a HellaSwag example as the original files hold them: an
    object with a string ctx, 4 string endings and a label from 0 to 3."""
    if not isinstance(example, dict):
        return False
    endings, label = example.get('endings'), example.get('label')
    return (isinstance(example.get('ctx'), str) and isinstance(endings, list) and len(endings) == 4
            and all(isinstance(e, str) for e in endings) and type(label) is int and 0 <= label < 4)


def read_hellaswag(path):
    """The examples of a HellaSwag jsonl file, one JSON object per line as in the original files
    (see is_hellaswag_example), each a dict."""
    examples = []
    try:
        with open(path, encoding='utf-8') as f:
            for n, line in enumerate(f, 1):
                try:
                    example = json.loads(line)
                except ValueError:
                    die(f"{path}, line {n}: not JSON")
                if not is_hellaswag_example(example):
                    die(f"{path}, line {n}: not a HellaSwag example (a JSON object with a string ctx, "
                        f"4 string endings and a label from 0 to 3)")
                examples.append(example)
    except UnicodeDecodeError:
        die(f"{path} is not UTF-8 text")
    except OSError as e:
        die(f"cannot read {path}: {e.strerror}")
    if not examples:
        die(f"{path} holds no examples")
    return examples


def hellaswag_examples(data_root):
    """The examples of data_root/hellaswag/hellaswag_val.jsonl (see read_hellaswag); when it is
    missing, stop saying how to prepare it."""
    path = os.path.join(data_root, 'hellaswag', 'hellaswag_val.jsonl')
    if not os.path.exists(path):
        die(f"{path} not found: prepare it first with `python data/hellaswag/prepare.py"
            f"{'' if data_root == 'data' else f' --out_dir={os.path.dirname(path)}'}`")
    return read_hellaswag(path)


def check_hellaswag_vocab(vocab_size, enc):
    """A model scored on HellaSwag has every token of the GPT-2 encoding enc."""
    if vocab_size < enc.n_vocab:
        die(f"the model has a vocab_size of {vocab_size}: HellaSwag is scored in the GPT-2 encoding, "
            f"which needs {enc.n_vocab}")


# -----------------------------------------------------------------------------
# resuming

CHECKPOINT_KEYS = ('model_args', 'iter_num', 'best_val_loss')


def check_resume(ckpt_meta, block_size, meta_vocab_size, meta_path):
    """A checkpoint's metadata against the data and block_size of the run that resumes it."""
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt_meta]
    if missing:
        die(f"the checkpoint's metadata has no {', '.join(missing)}: it was not written by "
            f"train_jax.py; choose another --out_dir")
    model_args = ckpt_meta['model_args']
    if block_size != model_args['block_size']:
        die(f"block_size={block_size}, but the checkpoint's model has block_size "
            f"{model_args['block_size']}: resume with --block_size={model_args['block_size']}")
    if meta_vocab_size is not None:
        trained_on = ckpt_meta.get('config', {}).get('dataset')
        check_vocab_size(meta_path, meta_vocab_size, model_args['vocab_size'], "resume on the dataset it was "
                         "trained on" + (f" (--dataset={trained_on})" if trained_on else ""))


def check_vocab_size(meta_path, meta_vocab_size, model_vocab_size, advice):
    if meta_vocab_size != model_vocab_size:
        die(f"{meta_path} has vocab_size {meta_vocab_size}, but the checkpoint's model has "
            f"{model_vocab_size}: {advice}")


# -----------------------------------------------------------------------------
# sampling

def start_text_error(start, stoi, meta_path):
    """Why the start text cannot be sampled from, or None: it is empty, or has characters that are
    not in the character vocabulary stoi of meta_path (None: GPT-2's encoding, which has them all)."""
    if not start:
        return "the start text is empty"
    unknown = sorted(set(start) - set(stoi)) if stoi is not None else []
    if unknown:
        return (f"the start text has characters that are not in the vocabulary of {meta_path}: "
                f"{' '.join(map(repr, unknown[:10]))}: write it with the dataset's characters")
    return None


def stop_strings(stop):
    """The stop strings of the stop key: a string of them separated by | (not the | of <|endoftext|>
    and the like), or a list from a config file; '' is none."""
    stops = (re.split(r'(?<!<)\|(?!>)', stop) if stop else []) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        die(f"stop={stop!r} is not allowed: stop is a string, several separated by |, or a list of strings")
    if '' in stops:
        die(f"stop={stop!r} has an empty stop string, where every sample would end at once: "
            f"separate the stop strings with single | and give none at either end")
    return list(stops)
