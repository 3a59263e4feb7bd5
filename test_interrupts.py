"""
^C and SIGTERM, sent to the scripts as a user's terminal or a scheduler would: the first is
answered at once with one line on stderr, training then stops at its next safe point (after the
compilation, the evaluation batch or the iteration in progress) with a checkpoint to resume from;
the second ends it at once. Sampling and the other scripts stop at the first, with one line.
"""

import os
import queue
import signal
import subprocess
import threading
import time

import pytest

import checkpoints
from conftest import start_script, run_script, lines
from test_robustness import ARGS, data_root, unfinished_saves  # noqa: F401 (data_root: a fixture)

LONG_EVALUATION = ['--eval_iters=5000']  # the tiny model's evaluation then lasts seconds
LONG_ITERATION = ['--gradient_accumulation_steps=3000']  # and so does an iteration


def started(script, args, script_env, stdin=None):
    """The script running, its stdout and stderr read line by line on threads: p.seen[stream] is
    every (time, line) so far, p.lines[stream] a queue of them."""
    p = start_script(script, args, script_env, stdin=stdin)
    p.seen, p.lines = {}, {}
    for name in ('stdout', 'stderr'):
        p.seen[name], p.lines[name] = [], queue.Queue()

        def read(stream=getattr(p, name), seen=p.seen[name], q=p.lines[name]):
            for line in iter(stream.readline, ''):
                seen.append((time.monotonic(), line.rstrip('\n')))
                q.put(seen[-1])
        threading.Thread(target=read, daemon=True).start()
    return p


def line_after(p, stream, prefix, timeout=120):
    """(time, line): the next line of p's stream that starts with prefix."""
    deadline = time.monotonic() + timeout
    while True:
        at, line = p.lines[stream].get(timeout=max(0.0, deadline - time.monotonic()))
        if line.startswith(prefix):
            return at, line


def stop(p, signum, prefix, timeout=120):
    """Send signum to p once its stdout has a line starting with prefix: the time it was sent."""
    line_after(p, 'stdout', prefix, timeout)
    p.send_signal(signum)
    return time.monotonic()


def answered(p, sent, line):
    """The stderr line that answers a signal sent at time sent is line, within a second."""
    at, said = line_after(p, 'stderr', line.split(':')[0], timeout=10)
    assert said == line and at - sent < 1, (said, at - sent)


def ended(p, code, within):
    """p ends with exit code code within `within` seconds, with no traceback: its stderr lines."""
    start = time.monotonic()
    assert p.wait(timeout=within + 60) == code, [l for _, l in p.seen['stderr']][-20:]
    assert time.monotonic() - start < within
    stderr = [l for _, l in p.seen['stderr']]
    assert not any('Traceback' in l or 'Exception ignored' in l for l in stderr), stderr
    return stderr


def first_line(name, after):
    return f"{name} received: stopping after {after}, with a checkpoint to resume from; {name} again stops at once"


@pytest.fixture(scope='module')
def stopped_at_compilation(data_root, script_env, tmp_path_factory):
    """A run that ^C stopped while it compiled (no compilation cache): it saved iteration 0."""
    out_dir = tmp_path_factory.mktemp('stopped')
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}', '--compilation_cache=']
    p = started('train_jax.py', args, script_env)
    sent = stop(p, signal.SIGINT, 'compiling')
    answered(p, sent, first_line('^C', 'the compilation in progress'))
    ended(p, 130, within=60)
    return out_dir, p


def test_a_stop_during_compilation_saves_the_start(stopped_at_compilation):
    out_dir, p = stopped_at_compilation
    stdout = [l for _, l in p.seen['stdout']]
    assert 'SIGINT received: stopping at iter 0' in stdout and not lines('\n'.join(stdout), 'step ')
    assert os.listdir(out_dir) == ['0']  # no row logged yet, so no metrics.csv


def test_stops_during_an_evaluation_and_an_iteration_then_resume(stopped_at_compilation, data_root, script_env):
    """SIGTERM during a long evaluation: the run stops after the batch in progress, its checkpoint (the
    one it started from) kept. ^C during a long iteration, then ^C again: the run ends within 3 s, one
    line, nothing half-written. Resumed, the run goes on from the last checkpoint."""
    out_dir, _ = stopped_at_compilation
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}', '--init_from=resume']
    p = started('train_jax.py', args + LONG_EVALUATION, script_env)
    sent = stop(p, signal.SIGTERM, 'compiled in')
    answered(p, sent, first_line('SIGTERM', 'the evaluation batch in progress'))
    assert ended(p, 143, within=10)[-1].startswith('SIGTERM received')
    assert os.listdir(out_dir) == ['0']

    p = started('train_jax.py', args + LONG_ITERATION, script_env)
    sent = stop(p, signal.SIGINT, 'step 0:')
    at, said = line_after(p, 'stderr', '^C received')
    assert said.startswith("^C received: stopping after the iteration in progress (about ") and at - sent < 1, said
    p.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert ended(p, 130, within=3)[-1] == '^C received: stopped'
    assert sorted(os.listdir(out_dir)) == ['0', 'metrics.csv']  # nothing half-written, the lock released

    resumed = run_script('train_jax.py', args + ['--max_iters=0'], script_env).stdout
    assert lines(resumed, 'iter ')[0].startswith('iter 0:')


def test_sampling_stops_at_the_first_signal_with_one_line(stopped_at_compilation, script_env):
    """sample_jax.py, plain, streaming and interactive: ^C (or SIGTERM) ends each at once, one line, no
    traceback (eval_hellaswag.py: test_hellaswag.py)."""
    out_dir, _ = stopped_at_compilation
    sample = [f'--out_dir={out_dir}', '--max_new_tokens=100000', '--num_samples=2']
    runs = [(sample, 'Loading meta', signal.SIGINT, None),
            (sample + ['--stream=True'], 'Loading meta', signal.SIGTERM, None),
            (sample + ['--interactive=True'], 'Loading meta', signal.SIGINT, subprocess.PIPE)]
    for args, prefix, signum, stdin in runs:
        p = started('sample_jax.py', args, script_env, stdin=stdin)
        if stdin:
            p.stdin.write('the cat\n')
            p.stdin.flush()
        sent = stop(p, signum, prefix)
        name = {signal.SIGINT: '^C', signal.SIGTERM: 'SIGTERM'}[signum]
        answered(p, sent, f'{name} received: stopped')
        assert ended(p, 128 + signum, within=3) == [f'{name} received: stopped']



def test_a_stop_at_any_moment_of_a_run(data_root, script_env, tmp_path):
    """^C at start delays spread over a whole short run (runs side by side): each stops at once or at
    its next safe point, exit code 130 with one line on stderr, or had ended before (exit code 0);
    never a traceback, never a save left half-written."""
    delays = [0.3, 0.8, 2.5, 6]  # from 0.3 s: Python itself starts first (~50 ms, more on a busy machine)
    runs = []
    for i, delay in enumerate(delays):
        args = ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path / str(i)}', '--eval_interval=2']
        runs.append((started('train_jax.py', args, script_env), delay))
    start = time.monotonic()
    for p, delay in sorted(runs, key=lambda run: run[1]):
        time.sleep(max(0.0, start + delay - time.monotonic()))
        p.send_signal(signal.SIGINT)
        p.sent = time.monotonic()
    outcomes = []
    for i, (p, delay) in enumerate(runs):
        code = p.wait(timeout=120)
        stderr = [l for _, l in p.seen['stderr'] if l.strip()]
        assert not any('Traceback' in l or 'Exception ignored' in l for l in stderr), (delay, stderr)
        assert code in (0, 130), (delay, code, stderr)
        if code == 130:
            assert len(stderr) == 1 and stderr[0].startswith('^C received: stop'), (delay, stderr)
        else:  # the run was over: its last line came before the signal
            assert not stderr and p.seen['stdout'][-1][0] <= p.sent, (delay, stderr)
        if (tmp_path / str(i)).exists():
            assert not unfinished_saves(tmp_path / str(i))
        outcomes.append(code)
    assert outcomes[0] == 130  # at least the earliest stop landed in a run


def test_a_stop_keeps_the_best_checkpoint(data_root, script_env, tmp_path):
    """With always_save_checkpoint=False a run keeps the checkpoint of its best val loss; a stop after
    val got worse writes its own beside it: a resume continues from the stop, sampling reads the best."""
    out_dir = tmp_path / 'out'
    args = ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}', '--always_save_checkpoint=False']
    first = run_script('train_jax.py', args + ['--max_iters=8'], script_env).stdout
    best = max(int(n) for n in os.listdir(out_dir) if n.isdigit())
    val_loss = lambda stdout, step: float(lines(stdout, f'step {step}:')[0].split('val loss ')[1])
    # a learning rate far too high makes val worse at the evaluation of iteration 12, which saves nothing
    p = started('train_jax.py', args + ['--init_from=resume', '--learning_rate=10', '--max_iters=100'], script_env)
    sent = stop(p, signal.SIGINT, 'iter 13:')
    at, said = line_after(p, 'stderr', '^C received')
    assert said.startswith("^C received: stopping after the iteration in progress") and at - sent < 1, said
    ended(p, 130, within=30)
    stdout = '\n'.join(l for _, l in p.seen['stdout'])
    assert val_loss(stdout, 12) > val_loss(first, best)
    stopped = int(lines(stdout, 'SIGINT received: stopping at iter ')[0].split()[-1])
    assert sorted(os.listdir(out_dir)) == sorted([str(best), str(stopped), 'metrics.csv'])
    manager = checkpoints.checkpoint_manager(out_dir, read_only=True)
    assert checkpoints.newest_checkpoint(manager).meta['iter_num'] == stopped  # what a resume reads
    assert checkpoints.newest_checkpoint(manager, best=True).meta['iter_num'] == best  # sampling, export
