"""Robustness, tested as a user meets it: every bad input stops with a one-line error before any
work starts; SIGTERM, ^C, kill -9, a diverging loss, a full disk, a second run on the same out_dir
and running out of memory lose no work; the same config and seed print the same losses."""
import atexit
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from test_train import REPO, SMALL_ARGS, lines, metrics

# the tiny model of test_train.py, dropout and 2 micro-steps included, on a tiny dataset, checkpoints at 4, 8, 12
ARGS = SMALL_ARGS + ['--device=cpu', '--dataset=tiny', '--log_interval=1', '--eval_interval=4', '--max_iters=12']
WORDS = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'and', 'dog', 'ran', 'far', 'away,', 'home.\n']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """The runs share a compilation cache: the same model compiles once for the whole module."""
    return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def start(script, args, env, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, os.path.join(REPO, script)] + args, cwd=REPO, env=env, text=True,
                            stdout=stdout, stderr=subprocess.PIPE)


def run(script, args, env):
    p = start(script, args, env)
    stdout, stderr = p.communicate(timeout=300)
    return p.returncode, stdout, stderr


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
def reference(data_root, env, tmp_path_factory):
    """The uninterrupted run the others are compared with: its out_dir (a checkpoint at iter 12) and stdout."""
    out_dir = tmp_path_factory.mktemp('reference')
    code, stdout, stderr = run('train_jax.py', ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}'], env)
    assert code == 0, stderr[-3000:]
    assert sorted(os.listdir(out_dir)) == ['12', 'metrics.csv']
    return out_dir, stdout


def losses(stdout):
    """The loss lines, without their timings."""
    return [l.split(', time')[0] for l in lines(stdout, 'iter ')], lines(stdout, 'step ')


def file_hashes(folder):
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).digest()
            for d, _, files in os.walk(folder) for f in files}


# -----------------------------------------------------------------------------
# bad input: each case as a user would type it, the exact one-line error, exit code 2, no work done

TRAIN = ARGS + ['--data_root={data}', '--out_dir={new}']
RESUME = ARGS + ['--data_root={data}', '--out_dir={ref}', '--init_from=resume']
SAMPLE = ['--device=cpu', '--out_dir={ref}', '--max_new_tokens=5']
BAD_INPUT = [
    # configuration
    ('train_jax.py', ['--bacth_size=4'], "unknown config key 'bacth_size' (did you mean 'batch_size'?)"),
    ('train_jax.py', ['--zzz=4'], "unknown config key 'zzz'"),
    ('train_jax.py', ['--batch_size=2.5'], "--batch_size=2.5: expected a int like the default 12, got a float"),
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
    ('train_jax.py', TRAIN + ['--init_from=resume', '--out_dir={empty}'], "init_from='resume' but '{empty}' holds "
     "no checkpoint: train from scratch first, or point --out_dir at the run to resume"),
    ('train_jax.py', RESUME + ['--block_size=64'],
     "block_size=64, but the checkpoint's model has block_size 32: resume with --block_size=32"),
    ('train_jax.py', RESUME + ['--dataset=other_vocab'], "{data}/other_vocab/meta.pkl has vocab_size 40, but the "
     "checkpoint's model has 30: resume on the dataset it was trained on (--dataset=tiny)"),
    ('train_jax.py', RESUME + ['--out_dir={reshaped}', '--block_size=48'], "cannot restore the checkpoint "
     "{reshaped}/12 (ValueError: Requested shape: (48, 32) is not compatible with the stored shape: (32, 32)): it "
     "was written for another model or optimizer, or is damaged; start again in another --out_dir"),
    ('train_jax.py', RESUME + ['--out_dir={damaged}'], "cannot restore the checkpoint {damaged}/12 "
     "(JSONDecodeError: Expecting value: line 1 column 1 (char 0)): it was written for another model or optimizer, "
     "or is damaged; start again in another --out_dir"),
    # sampling
    ('sample_jax.py', SAMPLE + ['--top_k=0'], "top_k=0 is not allowed: top_k must be 1 or more"),
    ('sample_jax.py', SAMPLE + ['--temperature=-1.0'], "temperature=-1.0 is not allowed: temperature must be above "
     "0 (below 1 is less random, e.g. 0.01 is nearly greedy)"),
    ('sample_jax.py', SAMPLE + ['--start=the caf\u00e9~'], "the start text has characters that are not in the "
     "vocabulary of {data}/tiny/meta.pkl: '~' '\u00e9': write it with the dataset's characters"),
    ('sample_jax.py', SAMPLE + ['--out_dir={empty}'],
     "no checkpoint in out_dir '{empty}': train one with train_jax.py, or point --out_dir at one"),
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
def test_bad_input_stops_with_one_line_before_any_work(script, args, message, bad_input_paths, env):
    code, stdout, stderr = run(script, [a.format(**bad_input_paths) for a in args], env)
    assert (code, stderr) == (2, f"error: {message.format(**bad_input_paths)}\n")
    assert 'number of parameters' not in stdout


# -----------------------------------------------------------------------------
# interruption, divergence, determinism

def test_sigterm_saves_and_the_resumed_run_prints_the_same_losses(reference, data_root, env, tmp_path):
    """SIGTERM during iteration 3 or so: the iteration is finished, a checkpoint written, exit code
    143. Resumed, the run prints the losses of the uninterrupted one, dropout and 2 micro-steps
    included; up to the signal the two runs of the same config and seed printed the same too."""
    _, uninterrupted = reference
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}']
    p = start('train_jax.py', args, env)
    stdout = ''
    for line in p.stdout:
        stdout += line
        if line.startswith('iter 2:'):
            p.send_signal(signal.SIGTERM)
    assert p.wait() == 128 + signal.SIGTERM, p.stderr.read()[-3000:]
    stopped_at = int(re.search(r'^SIGTERM received: stopping at iter (\d+)\nsaving checkpoint', stdout, re.M)[1])
    assert 3 <= stopped_at < 12 and sorted(os.listdir(tmp_path)) == [str(stopped_at), 'metrics.csv']
    code, resumed, stderr = run('train_jax.py', args + ['--init_from=resume'], env)
    assert code == 0, stderr[-3000:]
    iters, steps = losses(stdout)
    more_iters, more_steps = losses(resumed)
    assert len(iters) == stopped_at and (iters + more_iters, steps + more_steps) == losses(uninterrupted)
    assert metrics(tmp_path) == metrics(reference[0])


def test_kill_9_while_saving_then_resume_and_interrupt(reference, data_root, env, tmp_path):
    """kill -9 while a checkpoint is being written leaves the previous one restorable, and orbax's
    unfinished folder does no harm; the resumed run prints the uninterrupted run's losses, then ^C
    stops it with a checkpoint at the iteration it names."""
    iters, _ = losses(reference[1])
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}', '--eval_interval=1']  # save every iteration
    p = start('train_jax.py', args + ['--max_iters=1000'], env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        names = os.listdir(tmp_path)
        if any(n.isdigit() for n in names) and any('tmp' in n for n in names):
            p.kill()
            break
        time.sleep(0.001)
    assert p.wait() == -signal.SIGKILL
    names = os.listdir(tmp_path)
    saved = max(int(n) for n in names if n.isdigit())
    assert f'{saved + 1}.orbax-checkpoint-tmp' in names  # killed while writing the next one
    killed = json.loads((tmp_path / 'train.lock').read_text())
    assert (killed['pid'], killed['host']) == (p.pid, socket.gethostname())  # its lock is left
    p = start('train_jax.py', args + ['--init_from=resume'], env)
    stdout = ''
    for line in p.stdout:
        stdout += line
        if line.startswith(f'iter {saved + 2}:'):
            p.send_signal(signal.SIGINT)
    assert p.wait() == 128 + signal.SIGINT, p.stderr.read()[-3000:]
    stopped_at = int(re.search(r'^SIGINT received: stopping at iter (\d+)$', stdout, re.M)[1])
    assert losses(stdout)[0] == iters[saved:stopped_at]
    assert f"taking over the lock of '{tmp_path}' from a run that is gone (pid {killed['pid']} on host " \
           f"{killed['host']}, started {killed['started']})" in stdout
    # the unfinished folder was cleaned up too, the lock released
    assert sorted(os.listdir(tmp_path)) == [str(stopped_at), 'metrics.csv']


def test_nan_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(reference, data_root, env, tmp_path):
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
    code, stdout, stderr = run('train_jax.py', args + ['--init_from=resume', '--log_interval=100'], env)
    assert (code, stderr) == (1, f"error: iter 16: eval loss is nan (train), nan (val): {kept}")
    assert lines(stdout, 'step ')[-1] == 'step 16: train loss nan, val loss nan' and 'saving' not in stdout
    code, stdout, stderr = run('train_jax.py', args + ['--overwrite_checkpoint=True'], env)
    assert (code, stderr) == (1, f"error: iter 2: loss is nan: {kept}")
    assert lines(stdout, 'iter ')[-1].startswith('iter 2: loss nan,')
    assert file_hashes(out_dir / '12') == before


def test_overwrite_replaces_the_checkpoint_when_the_new_run_saves(reference, data_root, env, tmp_path):
    """A new run with --overwrite_checkpoint=True replaces the checkpoint at its first save. It also
    prints the reference run's losses: the same config and seed give the same losses."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}', '--max_iters=4', '--overwrite_checkpoint=True']
    code, stdout, stderr = run('train_jax.py', args, env)
    assert code == 0, stderr[-3000:]
    iters, steps = losses(reference[1])
    assert losses(stdout) == (iters[:5], steps[:2])
    assert sorted(os.listdir(tmp_path)) == ['4', 'metrics.csv']


def test_a_save_replaces_the_checkpoint_of_another_run_at_any_iteration(tmp_path):
    """What --overwrite_checkpoint relies on: orbax only writes above the latest step and never over
    one, yet the new run's first save replaces the old checkpoint at the same or a lower iteration."""
    import jax_train_utils as tu
    for iter_num, run_name in ((12, 'old'), (12, 'new'), (4, 'newer')):
        manager = tu.checkpoint_manager(tmp_path)  # a new run opens out_dir
        state = SimpleNamespace(params={'w': np.ones(3)}, opt_state={'m': np.zeros(3)})
        tu.save_checkpoint(manager, state, {'iter_num': iter_num, 'run': run_name})
        manager.wait_until_finished()
        assert os.listdir(tmp_path) == [str(iter_num)]
        assert tu.restore_meta(tu.checkpoint_manager(tmp_path)) == {'iter_num': iter_num, 'run': run_name}


# -----------------------------------------------------------------------------
# faults during a run: a full disk, a second run on the same out_dir, out of memory

def test_a_training_run_removes_unfinished_saves_before_its_manager_opens(tmp_path):
    """The folders that killed saves leave are gone when checkpoint_manager returns, not later in a
    thread that an early exit (a bad flag) cuts off with a traceback; read-only opening keeps them."""
    import jax_train_utils as tu
    tu.save_checkpoint(tu.checkpoint_manager(tmp_path), SimpleNamespace(params={'w': np.ones(3)}, opt_state={'m': np.zeros(3)}),
                       {'iter_num': 3})
    for unfinished in ('4.orbax-checkpoint-tmp', '5.orbax-checkpoint-tmp-1764300000'):  # orbax 0.12 and 0.11 names
        (tmp_path / unfinished).mkdir()
        (tmp_path / unfinished / 'params').write_text('being written')
    assert tu.checkpoint_manager(tmp_path, read_only=True).latest_step() == 3 and len(os.listdir(tmp_path)) == 3
    assert tu.checkpoint_manager(tmp_path).latest_step() == 3 and os.listdir(tmp_path) == ['3']


def test_a_full_disk_stops_the_run_at_that_save_and_loses_nothing(reference, data_root, env, tmp_path):
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
        code, stdout, stderr = run('train_jax.py', args + [f'--out_dir={out_dir}'], env)
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
    code, resumed, stderr = run('train_jax.py', args + [f'--out_dir={roomy}'], env)
    assert code == 0, stderr[-3000:]
    assert lines(resumed, 'step ') == lines(stdout, 'step ') and sorted(os.listdir(roomy)) == ['16', 'metrics.csv']


def test_a_second_run_on_the_same_out_dir_is_refused_and_touches_nothing(reference, data_root, env, tmp_path):
    """While a run trains, a second resume of its out_dir stops at once with one line naming the
    first. It changes none of the first run's files, not even the unfinished folder of a save in
    progress; the first carries on, then stops on SIGTERM with its checkpoint."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}', '--init_from=resume']
    first = start('train_jax.py', args + ['--max_iters=100000', '--eval_interval=100000'], env)
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
    code, stdout, stderr = run('train_jax.py', args, env)
    assert (code, stderr) == (2, f"error: out_dir '{tmp_path}' is in use by another run (pid {first.pid} on host "
                                 f"{holder['host']}, started {holder['started']}): wait for it to end or stop it, or "
                                 f"choose another --out_dir\n")
    assert 'number of parameters' not in stdout and run_files() == before
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = int(re.search(r'^SIGTERM received: stopping at iter (\d+)$', stdout, re.M)[1])
    assert sorted(os.listdir(tmp_path)) == [str(stopped_at), '99.orbax-checkpoint-tmp', 'metrics.csv']  # lock released
    import jax_train_utils as tu
    assert tu.restore_meta(tu.checkpoint_manager(tmp_path, read_only=True))['iter_num'] == stopped_at


def test_a_lock_from_another_host_is_taken_over_once_no_longer_refreshed(tmp_path, monkeypatch):
    """out_dir on a filesystem that several hosts share: another host's lock holds while its run
    refreshes it, and is taken over once it has not for LEASE_EXPIRY seconds. The new holder
    refreshes its own, and releases it."""
    import jax_train_utils as tu
    lock = tmp_path / 'train.lock'
    lock.write_text(json.dumps({'host': 'other-host', 'pid': 7, 'started': '2030-01-01 00:00:00'}))
    refreshed = time.time() - 30
    os.utime(lock, (refreshed, refreshed))
    with pytest.raises(ValueError) as refused:
        tu.take_lock(str(tmp_path))
    assert str(refused.value) == f"out_dir '{tmp_path}' is in use by another run (pid 7 on host other-host, started " \
        f"2030-01-01 00:00:00): wait for it to end or stop it, or choose another --out_dir; it refreshed its lock " \
        f"30 s ago, which is taken over after 600 s without"
    refreshed = time.time() - tu.LEASE_EXPIRY - 1
    os.utime(lock, (refreshed, refreshed))
    monkeypatch.setattr(tu, 'LEASE_REFRESH', 0.01)
    release = tu.take_lock(str(tmp_path))
    atexit.unregister(release)
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    os.utime(lock, (0, 0))
    deadline = time.time() + 60
    while os.path.getmtime(lock) == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert time.time() - os.path.getmtime(lock) < 60
    release()
    assert not lock.exists()


def test_out_of_memory_says_what_to_try_and_keeps_the_checkpoint(reference, data_root, env, tmp_path):
    """A new run over a checkpoint (--overwrite_checkpoint=True) with batches of 4096 x 1024 tokens,
    under a 16 GB limit on its address space: XLA's allocation of ~40 GB for the first evaluation
    fails as a full device's would. One line says what to try; exit code 1; the checkpoint is as it was."""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    before = file_hashes(tmp_path)
    limited = "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30)); " \
              "sys.argv[0] = 'train_jax.py'; runpy.run_path('train_jax.py', run_name='__main__')"
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path}', '--overwrite_checkpoint=True',
                   '--block_size=1024', '--batch_size=4096', '--gradient_accumulation_steps=1', '--eval_iters=1',
                   '--cpu_devices=1']
    out = subprocess.run([sys.executable, '-c', limited] + args, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and re.fullmatch(
        r"error: out of memory in evaluation \(allocating \d+\.\d GiB, with 0\.7 MiB of params and optimizer state "
        r"per device\): try a smaller --batch_size with more --gradient_accumulation_steps \(the same tokens per "
        r"iteration\)\n", out.stderr), out.stderr[-3000:]
    assert file_hashes(tmp_path) == before


def test_out_of_memory_message_offers_what_the_run_does_not_do_yet():
    """The same line for a GPU's message, which names the size, and a TPU's, which does not; remat
    helps the training step alone, fsdp needs several devices."""
    import jax_train_utils as tu
    gpu = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25769803776 bytes.")
    assert tu.out_of_memory_message(gpu, 'the training step', 1_500_000_000, False, False, 8) == \
        "out of memory in the training step (allocating 24.0 GiB, with 1.4 GiB of params and optimizer state per " \
        "device): try a smaller --batch_size with more --gradient_accumulation_steps (the same tokens per " \
        "iteration), or --remat=True, or --fsdp=True"
    tpu = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.48G hbm.")
    assert tu.out_of_memory_message(tpu, 'evaluation', 500 * 2**20, False, False, 1) == \
        "out of memory in evaluation (RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm, with 500.0 MiB of " \
        "params and optimizer state per device): try a smaller --batch_size with more " \
        "--gradient_accumulation_steps (the same tokens per iteration)"


def test_a_failed_write_is_named_by_the_system_error():
    """What a failed save says, whether Python or tensorstore reports the system's error."""
    import jax_train_utils as tu
    assert tu.error_reason(PermissionError(13, 'Permission denied', '/out/16')) == 'Permission denied'
    assert tu.error_reason(ValueError('DATA_LOSS: Error writing "h_0/0" in OCDBT database at local file "/out/": '
                                      'Failed writing: [os_error_code=5]')) == 'Input/output error'
