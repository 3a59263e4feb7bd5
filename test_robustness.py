"""Robustness, tested as a user meets it: every bad input stops with a one-line error before any
work starts; SIGTERM, ^C, kill -9, a diverging loss, a full disk, a second run on the same out_dir
and running out of memory lose no work; the same config and seed print the same losses."""
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

import checkpoints
from conftest import REPO, run_script, start_script, lines, metrics, file_hashes
from test_train import SMALL_ARGS

# the tiny model of test_train.py, dropout and 2 micro-steps included, on a tiny dataset, checkpoints at 4, 8, 12
ARGS = SMALL_ARGS + ['--device=cpu', '--dataset=tiny', '--log_interval=1', '--eval_interval=4', '--max_iters=12']
WORDS = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'dog', 'ran', 'far', 'away,', 'home.\n']


def run(script, args, script_env):
    """(exit code, stdout, stderr) of the script run to its end."""
    p = run_script(script, args, script_env, check=False)
    return p.returncode, p.stdout, p.stderr


def write_dataset(root, name, train, val, meta):
    os.makedirs(root / name)
    np.asarray(train, dtype=np.uint16).tofile(root / name / 'train.bin')
    np.asarray(val, dtype=np.uint16).tofile(root / name / 'val.bin')
    with open(root / name / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """'tiny', a character dataset of 30 characters, and broken copies of it."""
    root = tmp_path_factory.mktemp('data')
    text = ' '.join(np.random.default_rng(0).choice(WORDS, size=8000))
    chars = sorted(set(text + 'bcdefghijklopqsuvwxyz'))
    meta = {'vocab_size': len(chars), 'stoi': {c: i for i, c in enumerate(chars)}, 'itos': dict(enumerate(chars))}
    ids = np.array([meta['stoi'][c] for c in text])
    n = int(0.9 * len(ids))
    write_dataset(root, 'tiny', ids[:n], ids[n:], meta)
    write_dataset(root, 'big_ids', np.append(ids[:n], 99), ids[n:], meta)
    write_dataset(root, 'no_vocab', ids[:n], ids[n:], {'stoi': meta['stoi'], 'itos': meta['itos']})
    write_dataset(root, 'other_vocab', ids[:n], ids[n:], dict(meta, vocab_size=40))
    write_dataset(root, 'odd_bytes', ids[:n], ids[n:], meta)
    with open(root / 'odd_bytes' / 'train.bin', 'ab') as f:
        f.write(b'\0')
    return root


@pytest.fixture(scope='module')
def reference(data_root, script_env, tmp_path_factory):
    """The uninterrupted run the others are compared with: its out_dir (a checkpoint at iter 12) and stdout."""
    out_dir = tmp_path_factory.mktemp('reference')
    code, stdout, stderr = run('train_jax.py', ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}'], script_env)
    assert code == 0, stderr[-3000:]
    assert sorted(os.listdir(out_dir)) == ['12', 'metrics.csv']
    return out_dir, stdout


def losses(stdout):
    """The loss lines, without their timings."""
    return [l.split(', time')[0] for l in lines(stdout, 'iter ')], lines(stdout, 'step ')


# -----------------------------------------------------------------------------
# bad input: each case as a user would type it, the exact one-line error, exit code 2, no work done

TRAIN = ARGS + ['--data_root={data}', '--out_dir={new}']
RESUME = ARGS + ['--data_root={data}', '--out_dir={ref}', '--init_from=resume']
SAMPLE = ['--device=cpu', '--out_dir={ref}', '--max_new_tokens=5']
BAD_INPUT = [
    # configuration
    ('train_jax.py', ['--bacth_size=4'], "unknown config key 'bacth_size' (did you mean 'batch_size'?)"),
    ('train_jax.py', ['--zzz=4'], "unknown config key 'zzz'"),
    ('train_jax.py', ['--batch_size=2.5'], "--batch_size=2.5: expected an int like the default 12, got a float"),
    ('train_jax.py', ['--compile=yes'], "--compile=yes: expected a bool like the default True, got a str"),
    ('train_jax.py', ['--batch_size'], "--batch_size: overrides are written --key=value"),
    ('train_jax.py', ['config/no_such_config.py'],
     "cannot read config file config/no_such_config.py: No such file or directory"),
    ('train_jax.py', ['{broken_config}'], "config file {broken_config}, line 2: SyntaxError: invalid syntax"),
    ('train_jax.py', TRAIN + ['--n_embd=30', '--n_head=4'], "n_embd=30 is not divisible by n_head=4: every head "
     "gets n_embd / n_head channels, choose n_embd a multiple of n_head"),
    ('train_jax.py', TRAIN + ['--batch_size=0'], "batch_size=0 is not allowed: batch_size must be 1 or more"),
    ('train_jax.py', TRAIN + ['--learning_rate=-0.001'],
     "learning_rate=-0.001 is not allowed: learning_rate must be 0 or more"),
    ('train_jax.py', TRAIN + ['--eval_iters=0'], "eval_iters=0 is not allowed: eval_iters must be 1 or more"),
    ('train_jax.py', TRAIN + ['--dropout=1.0'], "dropout=1.0 is not allowed: dropout must be at least 0 and below 1"),
    ('train_jax.py', TRAIN + ['--seed=-1'], "seed=-1 is not allowed: seed must be 0 or more"),
    ('train_jax.py', TRAIN + ['--dtype=float64'], "unknown dtype 'float64': use 'float32', 'bfloat16' or 'auto'"),
    ('train_jax.py', TRAIN + ['--dtype=float16'], "dtype 'float16' needs loss scaling, which this port does not "
     "do: use --dtype=bfloat16 (GPU/TPU) or --dtype=float32"),
    ('train_jax.py', TRAIN + ['--init_from=gpt3'], "init_from='gpt3': use 'scratch', 'resume', one of gpt2, "
     "gpt2-medium, gpt2-large, gpt2-xl or an existing folder holding a Hugging Face GPT-2"),
    ('train_jax.py', TRAIN + ['--cpu_devices=8'], "gradient_accumulation_steps=2 and batch_size=4 cannot be split "
     "over 8 devices: make one of them a multiple of 8 (e.g. --gradient_accumulation_steps=8 or --batch_size=8)"),
    ('train_jax.py', TRAIN + ['--cpu_devices=4', '--batch_size=2', '--gradient_accumulation_steps=4',
                              '--eval_iters=3'], "eval_iters=3 and batch_size=2 cannot be split over 4 devices: "
     "make one of them a multiple of 4 (e.g. --eval_iters=4 or --batch_size=4)"),
    # out_dir
    ('train_jax.py', TRAIN + ['--out_dir={file}/out'],
     "cannot write to out_dir '{file}/out': Not a directory: choose another --out_dir"),
    ('train_jax.py', TRAIN + ['--out_dir={ref}'], "out_dir '{ref}' already holds a checkpoint (iter 12): continue "
     "it with --init_from=resume, choose another --out_dir, or replace it with --overwrite_checkpoint=True"),
    # data
    ('train_jax.py', TRAIN + ['--dataset=tiyn'], "{data}/tiyn/train.bin not found: there is no dataset 'tiyn' in "
     "data_root '{data}': did you mean --dataset=tiny?"),
    ('train_jax.py', TRAIN + ['--data_root={new}'], "{new}/tiny/train.bin not found: there is no dataset 'tiny' in "
     "data_root '{new}': check --dataset and --data_root"),
    ('train_jax.py', TRAIN + ['--dataset=openwebtext'], "{data}/openwebtext/train.bin not found: prepare it first "
     f"with `python {REPO}/data/openwebtext/prepare.py`"),
    ('train_jax.py', TRAIN + ['--dataset=odd_bytes'], "{data}/odd_bytes/train.bin is 60,051 bytes, not a whole "
     "number of uint16 tokens: the file is damaged or was not written by a prepare.py; prepare the dataset again"),
    ('train_jax.py', TRAIN + ['--dataset=big_ids'], "{data}/big_ids/train.bin holds token id 99, but vocab_size is "
     "30 ({data}/big_ids/meta.pkl): the data was made with another vocabulary; prepare it again or choose the "
     "matching --dataset"),
    ('train_jax.py', TRAIN + ['--dataset=no_vocab'], "{data}/no_vocab/meta.pkl has no vocab_size: it was not "
     "written by a prepare.py of this project; prepare the dataset again"),
    ('train_jax.py', TRAIN + ['--block_size=4000'], "{data}/tiny/val.bin holds 3,337 tokens, too few for a block "
     "of block_size=4000 and its next token: use a smaller --block_size or more data"),
    # resuming
    ('train_jax.py', TRAIN + ['--init_from=resume', '--out_dir=/no/such/dir'],
     "init_from='resume' but out_dir '/no/such/dir' does not exist"),
    ('train_jax.py', TRAIN + ['--init_from=resume', '--out_dir={empty}'], "no checkpoint in out_dir '{empty}': "
     "train one with train_jax.py, or point --out_dir at one"),
    ('train_jax.py', RESUME + ['--block_size=64'],
     "block_size=64, but the checkpoint's model has block_size 32: resume with --block_size=32"),
    ('train_jax.py', RESUME + ['--dataset=other_vocab'], "{data}/other_vocab/meta.pkl has vocab_size 40, but the "
     "checkpoint's model has 30: resume on the dataset it was trained on (--dataset=tiny)"),
    # … stands for a library's own words (orbax's, json's), whatever they are
    ('train_jax.py', RESUME + ['--out_dir={reshaped}', '--block_size=48'], "cannot restore the checkpoint "
     "{reshaped}/12 (ValueError: …): it was written for another model or optimizer, or is damaged; start again "
     "in another --out_dir"),
    ('train_jax.py', RESUME + ['--out_dir={damaged}'], "cannot restore the checkpoint {damaged}/12 "
     "(JSONDecodeError: …): it was written for another model or optimizer, or is damaged; start again in another "
     "--out_dir"),
    # sampling
    ('sample_jax.py', SAMPLE + ['--top_k=0'], "top_k=0 is not allowed: top_k must be 1 or more"),
    ('sample_jax.py', SAMPLE + ['--top_p=0'], "top_p=0.0 is not allowed: top_p is a probability, above 0 and at most 1 "
     "(1.0 turns it off)"),
    ('sample_jax.py', SAMPLE + ['--top_p=1.5'], "top_p=1.5 is not allowed: top_p is a probability, above 0 and at most "
     "1 (1.0 turns it off)"),
    ('sample_jax.py', SAMPLE + ['--temperature=-1.0'], "temperature=-1.0 is not allowed: temperature must be above "
     "0 (below 1 is less random, e.g. 0.01 is nearly greedy)"),
    ('sample_jax.py', SAMPLE + ['--stop=END||\n'], "stop='END||\\n' has an empty stop string, where every sample "
     "would end at once: separate the stop strings with single | and give none at either end"),
    ('sample_jax.py', SAMPLE + ['--start=the caf\u00e9~'], "the start text has characters that are not in the "
     "vocabulary of {data}/tiny/meta.pkl: '~' '\u00e9': write it with the dataset's characters"),
    ('sample_jax.py', SAMPLE + ['--out_dir={empty}'],
     "no checkpoint in out_dir '{empty}': train one with train_jax.py, or point --out_dir at one"),
    # exporting
    ('export_hf.py', ['--out_dir={ref}', '--hf_dir={file}'], "hf_dir '{file}' is a file: choose another --hf_dir"),
    ('export_hf.py', ['--out_dir={ref}', '--hf_dir={file}/hf'],
     "cannot write to hf_dir '{file}/hf': Not a directory: choose another --hf_dir"),
    ('export_hf.py', ['--out_dir={ref}', '--hf_dir={ref}'],
     "hf_dir '{ref}' holds other files: choose another --hf_dir (a new or empty folder)"),
]


@pytest.fixture(scope='module')
def bad_input_paths(data_root, reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bad_input')
    (tmp / 'empty').mkdir()
    (tmp / 'file').write_text('')
    (tmp / 'broken.py').write_text("batch_size = 4\nn_layer = = 2\n")
    shutil.copytree(reference[0], tmp / 'damaged')
    (tmp / 'damaged' / '12' / 'meta' / 'metadata').write_text('garbage')
    shutil.copytree(reference[0], tmp / 'reshaped')  # its metadata names a longer wpe than it holds
    meta = json.loads((tmp / 'reshaped' / '12' / 'meta' / 'metadata').read_text())
    meta['model_args']['block_size'] = 48
    (tmp / 'reshaped' / '12' / 'meta' / 'metadata').write_text(json.dumps(meta))
    return dict(data=data_root, ref=reference[0], new=tmp / 'new', empty=tmp / 'empty', file=tmp / 'file',
                damaged=tmp / 'damaged', reshaped=tmp / 'reshaped', broken_config=tmp / 'broken.py')


@pytest.mark.parametrize('script,args,message', BAD_INPUT, ids=[m[:40] for _, _, m in BAD_INPUT])
def test_bad_input_stops_with_one_line_before_any_work(script, args, message, bad_input_paths, script_env):
    code, stdout, stderr = run(script, [a.format(**bad_input_paths) for a in args], script_env)
    expected = f"error: {message.format(**bad_input_paths)}\n"
    assert code == 2 and re.fullmatch(re.escape(expected).replace('…', r'[^\n]+'), stderr), stderr
    assert 'number of parameters' not in stdout


def test_eval_only_evaluates_once_at_any_iteration_and_says_which_shape_it_keeps(reference, data_root, script_env):
    """A checkpoint saved at an iteration that is not a multiple of eval_interval (any SIGTERM's) is
    evaluated; shape keys that differ from the checkpoint's are said to be its own."""
    code, stdout, stderr = run('train_jax.py', ARGS + [f'--data_root={data_root}', f'--out_dir={reference[0]}',
                                                       '--init_from=resume', '--eval_only=True', '--eval_interval=5',
                                                       '--n_layer=6', '--n_embd=64'], script_env)
    assert code == 0, stderr[-3000:]
    assert lines(stdout, 'step ') == lines(reference[1], 'step 12:') and not lines(stdout, 'iter ')
    assert lines(stdout, 'note: ') == ["note: resuming the checkpoint's model, whose n_layer=2 (not 6), n_embd=32 "
                                       "(not 64) are its own"]


def test_wandb_without_a_login_stops_before_any_work(data_root, script_env, tmp_path):
    env = {k: v for k, v in script_env.items() if not k.startswith('WANDB_')}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path))  # no ~/.netrc, no wandb settings
    code, stdout, stderr = run('train_jax.py', ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path / "out"}',
                                                       '--wandb_log=True'], env)
    assert code == 2 and re.fullmatch(r"error: wandb_log=True, but wandb cannot start \([^\n]+\): log in with `wandb "
                                      r"login` or WANDB_API_KEY, or log offline with WANDB_MODE=offline\n", stderr), stderr
    assert 'compiling' not in stdout and not lines(stdout, 'step ')


def test_overwriting_keeps_the_metrics_of_the_checkpoint_kept(reference, data_root, script_env, tmp_path):
    """A run replacing a checkpoint (--overwrite_checkpoint=True) that stops before its first save:
    the checkpoint and its metrics.csv stay as they were; the run's rows are in metrics.unsaved.csv."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    before = file_hashes(tmp_path)
    code, stdout, stderr = run('train_jax.py', ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}',
                                                       '--overwrite_checkpoint=True', '--max_iters=3',
                                                       '--eval_interval=100'], script_env)
    assert code == 0, stderr[-3000:]
    assert {p: h for p, h in file_hashes(tmp_path).items() if p != 'metrics.unsaved.csv'} == before
    assert [r[0] for r in metrics(tmp_path)] == [r[0] for r in metrics(reference[0])]
    with open(tmp_path / 'metrics.unsaved.csv') as f:
        assert [line.split(',')[0] for line in f][1:] == ['0', '0', '1', '2', '3']


def test_export_hf_replaces_a_folder_whole_when_told(reference, script_env, tmp_path):
    """Into an existing Hugging Face folder only with --overwrite=True, which leaves none of its files."""
    hf_dir = tmp_path / 'hf'
    run_script('export_hf.py', [f'--out_dir={reference[0]}', f'--hf_dir={hf_dir}'], script_env)
    (hf_dir / 'generation_config.json').write_text('{}')  # as transformers' save_pretrained writes
    before = file_hashes(hf_dir)
    code, _, stderr = run('export_hf.py', [f'--out_dir={reference[0]}', f'--hf_dir={hf_dir}'], script_env)
    assert (code, stderr) == (2, f"error: hf_dir '{hf_dir}' already holds a Hugging Face model: choose another "
                                 f"--hf_dir, or replace it with --overwrite=True\n")
    assert file_hashes(hf_dir) == before
    run_script('export_hf.py', [f'--out_dir={reference[0]}', f'--hf_dir={hf_dir}', '--overwrite=True'], script_env)
    assert sorted(os.listdir(hf_dir)) == ['config.json', 'model.safetensors']
    assert sorted(os.listdir(tmp_path)) == ['hf']  # nothing left beside it


def test_sampling_into_a_closed_pipe_stops_quietly(reference, script_env):
    """sample_jax.py | head -3, as Unix tools do: no BrokenPipeError."""
    p = start_script('sample_jax.py', ['--device=cpu', f'--out_dir={reference[0]}', '--max_new_tokens=200'],
                     script_env)
    head = [p.stdout.readline() for _ in range(3)]
    p.stdout.close()
    _, stderr = p.communicate(timeout=300)
    assert len(head) == 3 and p.returncode in (0, -signal.SIGPIPE) and 'Error' not in stderr, stderr


def test_help_lists_the_keys_with_their_defaults(script_env):
    for script, line in (('train_jax.py', "batch_size = 12  # if gradient_accumulation_steps > 1, this is the "
                                          "micro-batch size"),
                         ('sample_jax.py', "top_k = 200  # retain only the top_k most likely tokens, clamp others to "
                                           "have 0 probability")):
        p = run_script(script, ['--help'], script_env)
        assert line in p.stdout.splitlines() and 'number of parameters' not in p.stdout, p.stdout


def test_bench_says_a_step_too_big_for_memory_before_running_it(script_env):
    """bench_jax.py stops as train_jax.py does, rather than be killed by the kernel."""
    code, stdout, stderr = run('bench_jax.py', ['--device=cpu', '--real_data=False', '--n_layer=1', '--n_head=2',
                                                '--n_embd=32', '--vocab_size=50304', '--block_size=2048',
                                                '--batch_size=4096', '--num_steps=1'], script_env)  # logits of 1.7 TB
    assert code == 1 and re.fullmatch(r"error: the training step needs [\d,.]+ GiB of memory \(2 CPU devices x "
                                      r"[\d,.]+ GiB\), more than the [\d,.]+ GiB available: try [^\n]+\n", stderr), stderr
    assert 'ms/iter' not in stdout


class RunsCode:
    """Unpickled, calls function(*args): how a pickle runs code."""
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize('how, called', [('os.system', 'posix.system'), ('builtins.eval', 'builtins.eval'),
                                         ('deep in itos', 'posix.system')])
def test_a_meta_pkl_that_would_run_code_is_not_read(how, called, data_root, reference, tmp_path, script_env):
    """A shared dataset's meta.pkl that runs code when unpickled (through os.system, builtins.eval, or
    an object deep inside itos) stops training and sampling with one line, exit code 2, before it
    is built: the file it would have created is not there."""
    made = tmp_path / 'made_by_the_pickle'
    command = f'touch {made}'
    evil = {'os.system': RunsCode(os.system, command),
            'builtins.eval': RunsCode(eval, f"__import__('os').system({command!r})")}.get(how)
    meta = pickle.loads((data_root / 'tiny' / 'meta.pkl').read_bytes())
    if evil is None:
        meta['itos'][3] = [{'deep': (RunsCode(os.system, command),)}]
    else:
        meta['extra'] = evil
    root = tmp_path / 'data'
    shutil.copytree(data_root / 'tiny', root / 'tiny')
    (root / 'tiny' / 'meta.pkl').write_bytes(pickle.dumps(meta))
    # a checkpoint of tiny whose dataset, for sampling, is this copy
    out_dir = tmp_path / 'out'
    shutil.copytree(reference[0], out_dir)
    metadata = out_dir / '12' / 'meta' / 'metadata'
    metadata.write_text(metadata.read_text().replace(str(data_root), str(root)))
    expected = (f"error: {root}/tiny/meta.pkl is not data alone: reading it would call {called}, which can run any "
                f"code, so it was not read; prepare the dataset again, or ask whoever gave it to you\n")
    for script, args in (('train_jax.py', ARGS + [f'--data_root={root}', f'--out_dir={tmp_path / "new"}']),
                         ('sample_jax.py', ['--device=cpu', f'--out_dir={out_dir}', '--max_new_tokens=5'])):
        code, stdout, stderr = run(script, args, script_env)
        assert (code, stderr) == (2, expected), (script, stderr)
        assert not made.exists(), script


# -----------------------------------------------------------------------------
# interruption, divergence, determinism

def signal_at(p, prefix, signum):
    """Send signum to p once it prints a line starting with prefix: its whole stdout."""
    stdout = ''
    for line in p.stdout:
        stdout += line
        if line.startswith(prefix):
            p.send_signal(signum)
    return stdout


def uninterrupted(reference, data_root, script_env, out_dir, max_iters):
    """The losses of the run of ARGS done in one go up to max_iters, which the stopped and resumed
    runs are compared with wherever their stops landed (how far a run gets before a signal acts
    depends on the machine's load): up to 12 iterations, the reference run's first ones (evaluation
    and logging do not change the training), else those of a run in out_dir."""
    if max_iters <= 12:
        iters, steps = losses(reference[1])
        return iters[:max_iters + 1], [s for s in steps if int(s.split()[1].rstrip(':')) <= max_iters]
    p = run_script('train_jax.py', ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}',
                                          f'--max_iters={max_iters}'], script_env)
    return losses(p.stdout)


def test_sigterm_saves_and_the_resumed_run_prints_the_same_losses(reference, data_root, script_env, tmp_path):
    """SIGTERM after iteration 2: the iteration is finished, a checkpoint written, exit code 143.
    Resumed, the run prints the losses of an uninterrupted one, dropout and 2 micro-steps included,
    and metrics.csv ends as that run's does."""
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path / "stopped"}']
    p = start_script('train_jax.py', args + ['--max_iters=100000'], script_env)
    stdout = signal_at(p, 'iter 2:', signal.SIGTERM)
    assert p.wait(timeout=300) == 128 + signal.SIGTERM, p.stderr.read()[-3000:]
    stopped_at = int(re.search(r'^SIGTERM received: stopping at iter (\d+)\nsaving checkpoint', stdout, re.M)[1])
    assert stopped_at >= 3 and sorted(os.listdir(tmp_path / 'stopped')) == [str(stopped_at), 'metrics.csv']
    end = max(12, stopped_at + 1)  # the reference run's end, unless the stop came later
    resumed = run_script('train_jax.py', args + ['--init_from=resume', f'--max_iters={end}'], script_env).stdout
    (iters, steps), (more_iters, more_steps) = losses(stdout), losses(resumed)
    assert len(iters) == stopped_at
    whole = uninterrupted(reference, data_root, script_env, tmp_path / 'whole', end)
    assert (iters + more_iters, steps + more_steps) == whole
    assert metrics(tmp_path / 'stopped') == metrics(reference[0] if end == 12 else tmp_path / 'whole')


def unfinished_saves(out_dir):
    return [n for n in os.listdir(out_dir) if '.orbax-checkpoint-tmp' in n]  # orbax 0.11 adds a time to the name


def test_kill_9_while_saving_then_resume_and_interrupt(reference, data_root, script_env, tmp_path):
    """kill -9 while a checkpoint is being written leaves the previous one restorable, and orbax's
    unfinished folder does no harm; the resumed run prints the uninterrupted run's losses, then ^C
    stops it with a checkpoint at the iteration it names."""
    out_dir = tmp_path / 'out'
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}', '--eval_interval=1',  # a save every iteration
                   '--max_iters=100000']
    p = start_script('train_jax.py', args, script_env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:  # until a save is in progress beside a complete checkpoint, seen while the run is stopped
        assert time.time() < deadline and p.poll() is None
        if out_dir.exists() and unfinished_saves(out_dir) and any(n.isdigit() for n in os.listdir(out_dir)):
            p.send_signal(signal.SIGSTOP)
            os.waitpid(p.pid, os.WUNTRACED)  # returns once every thread of the run has stopped
            if unfinished_saves(out_dir):
                break
            p.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    p.kill()
    assert p.wait(timeout=60) == -signal.SIGKILL
    names = os.listdir(out_dir)
    saved = max(int(n) for n in names if n.isdigit())
    assert [n.split('.')[0] for n in unfinished_saves(out_dir)] == [str(saved + 1)]  # killed writing the next one
    killed = json.loads((out_dir / 'train.lock').read_text())
    assert (killed['pid'], killed['host']) == (p.pid, socket.gethostname())  # its lock is left
    p = start_script('train_jax.py', args + ['--init_from=resume'], script_env)
    stdout = signal_at(p, f'iter {saved + 2}:', signal.SIGINT)
    assert p.wait(timeout=300) == 128 + signal.SIGINT, p.stderr.read()[-3000:]
    stopped_at = int(re.search(r'^SIGINT received: stopping at iter (\d+)$', stdout, re.M)[1])
    whole_iters, _ = uninterrupted(reference, data_root, script_env, tmp_path / 'whole', stopped_at)
    assert losses(stdout)[0] == whole_iters[saved:stopped_at]
    assert f"taking over the lock of '{out_dir}' from a run that is gone (pid {killed['pid']} on host " \
           f"{killed['host']}, started {killed['started']})" in stdout
    # the unfinished folder was cleaned up too, the lock released
    assert sorted(os.listdir(out_dir)) == [str(stopped_at), 'metrics.csv']


def test_nan_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(reference, data_root, script_env, tmp_path):
    """A learning rate of 1e6 makes the loss NaN in a few iterations. Found at an eval (a resumed
    run) or at a log line (a run from scratch, which --overwrite_checkpoint=True lets start in the
    same out_dir: the old checkpoint goes only when the new run saves): exit code 1, and the
    checkpoint is untouched."""
    out_dir = tmp_path / 'out'
    shutil.copytree(reference[0], out_dir)
    before = file_hashes(out_dir / '12')
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}', '--learning_rate=1e6', '--max_iters=30']
    kept = f"training diverged; the last checkpoint in '{out_dir}' (iter 12) is kept: resume it with a lower " \
           f"--learning_rate\n"
    code, stdout, stderr = run('train_jax.py', args + ['--init_from=resume', '--log_interval=100'], script_env)
    assert (code, stderr) == (1, f"error: iter 16: eval loss is nan (train), nan (val): {kept}")
    assert lines(stdout, 'step ')[-1] == 'step 16: train loss nan, val loss nan' and 'saving' not in stdout
    code, stdout, stderr = run('train_jax.py', args + ['--overwrite_checkpoint=True'], script_env)
    assert (code, stderr) == (1, f"error: iter 2: loss is nan: {kept}")
    assert lines(stdout, 'iter ')[-1].startswith('iter 2: loss nan,')
    assert file_hashes(out_dir / '12') == before


def test_overwrite_replaces_the_checkpoint_when_the_new_run_saves(reference, data_root, script_env, tmp_path):
    """A new run with --overwrite_checkpoint=True replaces the checkpoint at its first save. It also
    prints the reference run's losses: the same config and seed give the same losses."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}', '--max_iters=4', '--overwrite_checkpoint=True']
    code, stdout, stderr = run('train_jax.py', args, script_env)
    assert code == 0, stderr[-3000:]
    iters, steps = losses(reference[1])
    assert losses(stdout) == (iters[:5], steps[:2])
    assert sorted(os.listdir(tmp_path)) == ['4', 'metrics.csv']


# -----------------------------------------------------------------------------
# faults during a run: a full disk, a second run on the same out_dir, out of memory

def test_a_full_disk_stops_the_run_at_that_save_and_loses_nothing(reference, data_root, script_env, tmp_path):
    """out_dir on a tmpfs with room for one checkpoint: resumed at iter 12, the run stops at its save
    at iter 16 with one line and exit code 1, its unfinished folder removed and checkpoint 12 byte
    for byte unchanged. Copied where there is room, out_dir resumes and evaluates iter 16 as the
    failed run did."""
    checkpoint = sum(-(-os.path.getsize(os.path.join(d, f)) // 4096) * 4 for d, _, fs in os.walk(reference[0])
                     for f in fs)  # KiB, in tmpfs pages
    disk = tmp_path / 'disk'
    disk.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={checkpoint * 3 // 2}k', 'tmpfs', str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs as a full disk: {mounted.stderr.strip()}")
    try:
        out_dir = disk / 'out'
        shutil.copytree(reference[0], out_dir)
        args = ARGS + [f'--data_root={data_root}', '--init_from=resume', '--max_iters=16']
        code, stdout, stderr = run('train_jax.py', args + [f'--out_dir={out_dir}'], script_env)
        assert (code, stderr) == (1, f"error: saving the checkpoint to '{out_dir}' failed: No space left on device; "
                                     f"the last complete checkpoint (iter 12) is kept: fix that and resume with "
                                     f"--init_from=resume\n")
        assert lines(stdout, 'saving')[-1] == f'saving checkpoint to {out_dir}'
        assert sorted(os.listdir(out_dir)) == ['12', 'metrics.csv']
        assert file_hashes(out_dir / '12') == file_hashes(os.path.join(reference[0], '12'))
        roomy = tmp_path / 'roomy'
        shutil.copytree(out_dir, roomy)
    finally:
        subprocess.run(['umount', str(disk)], check=True)
    code, resumed, stderr = run('train_jax.py', args + [f'--out_dir={roomy}'], script_env)
    assert code == 0, stderr[-3000:]
    assert lines(resumed, 'step ') == lines(stdout, 'step ') and sorted(os.listdir(roomy)) == ['16', 'metrics.csv']


def test_a_second_run_on_the_same_out_dir_is_refused_and_touches_nothing(reference, data_root, script_env, tmp_path):
    """While a run trains, a second resume of its out_dir stops at once with one line naming the
    first. It changes none of the first run's files, not even the unfinished folder of a save in
    progress; the first carries on, then stops on SIGTERM with its checkpoint."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}', '--init_from=resume']
    first = start_script('train_jax.py', args + ['--max_iters=100000', '--eval_interval=100000'], script_env)
    for line in first.stdout:
        if line.startswith('iter 14:'):
            break
    (tmp_path / '99.orbax-checkpoint-tmp').mkdir()  # what a save in progress leaves, which a training run deletes on opening
    (tmp_path / '99.orbax-checkpoint-tmp' / 'params').write_text('being written')
    # every file but metrics.csv, which the first run writes as it goes
    run_files = lambda: {name: h for name, h in file_hashes(tmp_path).items() if name != 'metrics.csv'}
    before = run_files()
    holder = json.loads((tmp_path / 'train.lock').read_text())
    assert (holder['pid'], holder['host']) == (first.pid, socket.gethostname())
    code, stdout, stderr = run('train_jax.py', args, script_env)
    assert (code, stderr) == (2, f"error: out_dir '{tmp_path}' is in use by another run (pid {first.pid} on host "
                                 f"{holder['host']}, started {holder['started']}): wait for it to end or stop it, or "
                                 f"choose another --out_dir\n")
    assert 'number of parameters' not in stdout and run_files() == before
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = int(re.search(r'^SIGTERM received: stopping at iter (\d+)$', stdout, re.M)[1])
    # the lock released, and no unfinished save left by the stop
    assert sorted(os.listdir(tmp_path)) == [str(stopped_at), 'metrics.csv']
    manager = checkpoints.checkpoint_manager(tmp_path, read_only=True)
    assert checkpoints.newest_checkpoint(manager).meta['iter_num'] == stopped_at


def test_a_run_that_cannot_fit_in_memory_stops_before_any_work(reference, data_root, script_env, tmp_path):
    """A new run over a checkpoint (--overwrite_checkpoint=True) with batches of 65536 x 2048 tokens:
    the compiled steps' memory, known before the first one runs, is far more than the machine has.
    One line with both figures and what to try; exit code 1; nothing done, the checkpoint as it was."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    before = file_hashes(tmp_path)
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}', '--overwrite_checkpoint=True',
                   '--block_size=2048', '--batch_size=65536', '--gradient_accumulation_steps=2', '--eval_iters=2']
    code, stdout, stderr = run('train_jax.py', args, script_env)
    assert code == 1 and re.fullmatch(
        r"error: evaluation needs [\d,.]+ GiB of memory \(2 CPU devices x [\d,.]+ GiB\), more than the [\d,.]+ GiB "
        r"available: try a smaller --batch_size with more --gradient_accumulation_steps \(the same tokens per "
        r"iteration\), or --attention=blockwise, or --fsdp=True, or a shorter --block_size\n", stderr), stderr[-3000:]
    assert not lines(stdout, 'step ') and file_hashes(tmp_path) == before
