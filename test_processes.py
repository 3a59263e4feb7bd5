"""The processes of a multi-host run (processes.py), tested as a user meets them: two processes on
this machine's CPU (gloo collectives), their coordinator on 127.0.0.1. kill -9 of a process, between
saves or during one, process 0 (the coordinator) included, stops the other with one line and exit
code 1 within process_timeout; a process that does not join, a wrong coordinator address, another
config or other data stop every process at start with one line and exit code 2; a process that
crashes stops the other as a killed one does; SIGTERM to one process stops both at the same
iteration with a checkpoint. Resumed with both processes, the run prints the losses of the
uninterrupted one.

The runs stopped mid-way form one chain on one out_dir, each resuming where the one before stopped,
so that each case costs one start of two processes (which is slow: process 1 compiles what
process 0 loads from the compilation cache, as jax caches the programs of process 0 alone)."""
import os
import re
import shutil
import signal
import time

import pytest

import processes
from conftest import start_script, run_script, lines, reserved_port
from test_robustness import ARGS, data_root, losses, unfinished_saves  # noqa: F401 (data_root: a fixture)

PROCESS_TIMEOUT = 3  # seconds: the tests' bound on a process that stopped answering
JOIN_TIMEOUT = 3  # seconds: the tests' wait for a process that does not join; the others start within 60 s
TWO = ARGS + ['--cpu_devices=1', f'--process_timeout={PROCESS_TIMEOUT}', '--join_timeout=60']


def start_run(args, script_env, ports, extra=((), ())):
    """The processes of a run of two, one per port of ports, process i given args and extra[i] and
    told that the coordinator is at 127.0.0.1:ports[i]."""
    return [start_script('train_jax.py', list(args) + list(extra[i]),
                         dict(script_env, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{ports[i]}', JAX_NUM_PROCESSES='2',
                              JAX_PROCESS_ID=str(i)))
            for i in range(len(ports))]


def finish(procs, timeout=300):
    """[(exit code, stdout, stderr)] of each process, once all have ended; those still running
    after timeout seconds are killed, and the test fails."""
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()  # nothing for one that has ended
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def freeze(p):
    p.send_signal(signal.SIGSTOP)
    os.waitpid(p.pid, os.WUNTRACED)  # returns once every thread of p has stopped


def saved_steps(out_dir):
    return sorted(int(n) for n in os.listdir(out_dir) if n.isdigit())


def assert_continues(stdout, start, reference):
    """stdout is that of a run resumed at iteration start, with the losses of the reference run."""
    iters, steps = losses(stdout)
    ref_iters, ref_steps = losses(reference)
    assert iters[0].startswith(f'iter {start}:') and iters == ref_iters[start:start + len(iters)]
    assert set(steps) <= set(ref_steps)


# -----------------------------------------------------------------------------
# the chain of runs stopped mid-way, on one out_dir: each stage is a dict of the iteration it
# resumed at (start), each process's (exit code, stdout, stderr), the seconds from a kill to the
# survivor's exit, and the last checkpoint in out_dir once it ended (kept)

@pytest.fixture(scope='module')
def reference(data_root, script_env, tmp_path_factory):
    """The uninterrupted run's stdout: one process of two CPU devices computes what two processes of
    one device each do, to the bit."""
    out_dir = tmp_path_factory.mktemp('reference')
    return run_script('train_jax.py', ARGS + ['--cpu_devices=2', f'--data_root={data_root}', f'--out_dir={out_dir}'],
                      script_env).stdout


@pytest.fixture(scope='module')
def chain(data_root, tmp_path_factory):
    """The out_dir of the chain, and the arguments of its runs."""
    out_dir = tmp_path_factory.mktemp('chain')
    return out_dir, TWO + [f'--data_root={data_root}', f'--out_dir={out_dir}']


def stage(chain, script_env, stop, resume=True):
    """Run the two processes, resumed in the chain's out_dir, until stop(procs) has made them end:
    the stage (see above)."""
    out_dir, args = chain
    start = saved_steps(out_dir)[-1] if resume else 0
    with reserved_port() as port:
        procs = start_run(args + (['--init_from=resume'] if resume else []), script_env, [port, port])
        try:
            results, seconds = stop(procs)
        finally:
            for p in procs:
                p.kill()  # nothing for one that has ended
    return dict(start=start, results=results, seconds=seconds, kept=saved_steps(out_dir)[-1])


def kill_when(victim, ready):
    """A stop for stage: kill -9 the victim process once ready() holds, seen while the victim is
    frozen, then wait for the other one."""
    def stop(procs):
        deadline = time.time() + 300
        while True:
            assert time.time() < deadline and all(p.poll() is None for p in procs), finish(procs)
            if ready():
                freeze(procs[victim])
                if ready():
                    break
                procs[victim].send_signal(signal.SIGCONT)
            time.sleep(0.001)
        procs[victim].kill()
        killed = time.monotonic()
        procs[1 - victim].wait(timeout=60)
        return finish(procs), time.monotonic() - killed
    return stop


def sigterm_to_1_at(prefix):
    """A stop for stage: SIGTERM to process 1 alone once process 0 prints a line starting with prefix."""
    def stop(procs):
        stdout = ''
        for line in procs[0].stdout:
            stdout += line
            if line.startswith(prefix):
                procs[1].send_signal(signal.SIGTERM)
        (code, rest, err), second = finish(procs)
        return [(code, stdout + rest, err), second], None
    return stop


def a_save_in_progress(out_dir):
    """A ready for kill_when: a save in progress beside a complete checkpoint, not one that an
    earlier run left unfinished (a training run removes those as it starts)."""
    left = set(unfinished_saves(out_dir))

    def ready():
        unfinished = set(unfinished_saves(out_dir))
        left.intersection_update(unfinished)  # once gone, a name is the new run's
        return saved_steps(out_dir) and unfinished - left
    return ready


def training_past_a_checkpoint(out_dir):
    """A ready for kill_when: process 0 has logged the iteration after a checkpoint, and no save is
    in progress: the processes are in the collectives of a training step."""
    def ready():
        steps = saved_steps(out_dir)
        metrics = os.path.join(out_dir, 'metrics.csv')
        return steps and not unfinished_saves(out_dir) and os.path.exists(metrics) and \
            any(row.startswith(f'{steps[-1] + 1},') for row in open(metrics))
    return ready


@pytest.fixture(scope='module')
def killed_1_between_saves(chain, script_env):
    out_dir, _ = chain
    return stage(chain, script_env, kill_when(1, training_past_a_checkpoint(out_dir)), resume=False)


@pytest.fixture(scope='module')
def sigterm_to_1(chain, killed_1_between_saves, script_env):
    return stage(chain, script_env, sigterm_to_1_at(f"iter {killed_1_between_saves['kept'] + 1}:"))


@pytest.fixture(scope='module')
def killed_0_during_a_save(chain, sigterm_to_1, script_env):
    out_dir, _ = chain
    return stage(chain, script_env, kill_when(0, a_save_in_progress(out_dir)))


@pytest.fixture(scope='module')
def killed_1_during_a_save(chain, killed_0_during_a_save, script_env):
    out_dir, _ = chain
    unfinished = unfinished_saves(out_dir)  # process 0 was killed writing it
    done = stage(chain, script_env, kill_when(1, a_save_in_progress(out_dir)))
    return dict(done, unfinished_before=unfinished)


@pytest.fixture(scope='module')
def finished(chain, killed_1_during_a_save, script_env):
    return stage(chain, script_env, lambda procs: (finish(procs), None))


def assert_lost(victim, killed, resumed, out_dir, reference):
    """The stage killed killed the victim process: the other one stopped within process_timeout
    with its one line and exit code 1, and the next stage, resumed, continued from the checkpoint
    that line names, with the losses of the reference run."""
    code, _, stderr = killed['results'][1 - victim]
    assert killed['results'][victim][0] == -signal.SIGKILL and code == 1 and re.fullmatch(
        rf"error: iter \d+: process {victim} of 2 stopped answering, so the run stops; the last checkpoint in "
        rf"'{re.escape(str(out_dir))}' \(iter {killed['kept']}\) is kept: restart every process with "
        rf"--init_from=resume\n", stderr), stderr[-3000:]
    assert killed['seconds'] < PROCESS_TIMEOUT + 2
    assert resumed['start'] == killed['kept']
    assert_continues(resumed['results'][0][1], killed['kept'], reference)


def test_kill_9_of_process_1_between_saves(chain, killed_1_between_saves, sigterm_to_1, reference):
    """Process 0 stops within process_timeout, saying which process it lost, at which iteration,
    the checkpoint kept and what to do; resumed, the run continues from that checkpoint."""
    assert_lost(1, killed_1_between_saves, sigterm_to_1, chain[0], reference)


def test_sigterm_to_process_1_alone_stops_both_at_one_iteration(sigterm_to_1, killed_0_during_a_save, reference):
    """Both processes finish the iteration, save and exit with 143, as a single process does."""
    [(code_0, stdout, err_0), (code_1, _, err_1)] = sigterm_to_1['results']
    assert (code_0, code_1) == (128 + signal.SIGTERM,) * 2, err_0[-3000:] + err_1[-3000:]
    stopped_at = int(re.search(r'^SIGTERM received: stopping at iter (\d+)\nsaving checkpoint', stdout, re.M)[1])
    assert sigterm_to_1['kept'] == stopped_at and lines(stdout, 'iter ')[-1].startswith(f'iter {stopped_at - 1}:')
    assert killed_0_during_a_save['start'] == stopped_at
    assert_continues(killed_0_during_a_save['results'][0][1], stopped_at, reference)


def test_kill_9_of_process_0_during_a_save(chain, killed_0_during_a_save, killed_1_during_a_save, reference):
    """Process 1 loses the coordination service with process 0, and stops at once with the same
    kind of line; process 0's unfinished save is removed when the run starts again, and the run
    continues from the last complete checkpoint."""
    assert_lost(0, killed_0_during_a_save, killed_1_during_a_save, chain[0], reference)
    assert killed_1_during_a_save['unfinished_before']


def test_kill_9_of_process_1_during_a_save(chain, killed_1_during_a_save, finished, reference):
    """Process 0, whose save fails as process 1 dies, stops with the line of a lost process, not
    of a failed save; resumed, the run goes on to its end."""
    assert_lost(1, killed_1_during_a_save, finished, chain[0], reference)
    [(code_0, stdout, err_0), (code_1, _, err_1)] = finished['results']
    assert (code_0, code_1) == (0, 0), err_0[-3000:] + err_1[-3000:]
    assert lines(stdout, 'iter ')[-1].startswith('iter 12:') and not unfinished_saves(chain[0])


def test_a_process_that_crashes_stops_the_other(data_root, tmp_path_factory, script_env):
    """Process 1 reads a damaged meta.pkl and stops with its own error, while jax keeps it in the
    run until every process ends (its heartbeat goes on): process 0 stops within process_timeout,
    as the process no longer beats."""
    root, out_dir = tmp_path_factory.mktemp('damaged'), tmp_path_factory.mktemp('crash')
    shutil.copytree(data_root / 'tiny', root / 'tiny')
    (root / 'tiny' / 'meta.pkl').write_bytes(b'x' * os.path.getsize(root / 'tiny' / 'meta.pkl'))  # the same size
    with reserved_port() as port:
        [(code, _, stderr), (crashed, _, crash)] = finish(start_run(
            TWO + [f'--data_root={data_root}', f'--out_dir={out_dir}'], script_env, [port, port],
            extra=([], [f'--data_root={root}'])))
    assert crashed != 0 and crash == f"error: cannot read {root}/tiny/meta.pkl (UnpicklingError): prepare the " \
                                     f"dataset again\n"
    assert (code, stderr) == (1, "error: while starting: process 1 of 2 stopped answering, so the run "
                                 "stops; no checkpoint was written: restart every process\n")


# -----------------------------------------------------------------------------
# processes that cannot start together: each stops with one line, exit code 2, before any work

def test_a_process_that_does_not_join_is_named(data_root, script_env, tmp_path):
    """Process 0 alone of two: it waits join_timeout seconds, not jax's own wait, a minute longer,
    then says who came and who did not."""
    started = time.monotonic()
    with reserved_port() as port:
        [(code, stdout, stderr)] = finish(start_run(TWO + [f'--data_root={data_root}', f'--out_dir={tmp_path}',
                                                           f'--join_timeout={JOIN_TIMEOUT}'], script_env, [port]))
    assert time.monotonic() - started < 50
    assert (code, stderr) == (2, f"error: not every process joined the run within {JOIN_TIMEOUT} s: 2 processes "
                                 f"were expected at 127.0.0.1:{port}; process 0 came; process 1 did not: start every "
                                 f"process with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, each with its "
                                 f"own JAX_PROCESS_ID\n")
    assert 'number of parameters' not in stdout and not saved_steps(tmp_path)


def test_a_wrong_coordinator_address_is_named(data_root, script_env, tmp_path):
    """Process 1 told another port than process 0's: both wait join_timeout seconds, then each says
    where the other went."""
    with reserved_port() as port, reserved_port() as wrong:
        results = finish(start_run(TWO + [f'--data_root={data_root}', f'--out_dir={tmp_path}',
                                          f'--join_timeout={JOIN_TIMEOUT}'], script_env, [port, wrong]))
    advice = ": start every process with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, each with its own " \
             "JAX_PROCESS_ID\n"
    said = lambda expected, came: f"error: not every process joined the run within {JOIN_TIMEOUT} s: 2 processes " \
                                  f"were expected at 127.0.0.1:{expected}; {came}{advice}"
    assert [(code, err) for code, _, err in results] == [
        (2, said(port, f"process 0 came; process 1 came to 127.0.0.1:{wrong}")),
        (2, said(wrong, f"process 0 came to 127.0.0.1:{port}; process 1 came"))]
    assert not saved_steps(tmp_path)


@pytest.fixture(scope='module')
def other_data_root(data_root, tmp_path_factory):
    """A copy of the tiny dataset whose train.bin is shorter."""
    root = tmp_path_factory.mktemp('other_data')
    shutil.copytree(data_root / 'tiny', root / 'tiny')
    with open(root / 'tiny' / 'train.bin', 'r+b') as f:
        f.truncate(50_000)
    return root


@pytest.mark.parametrize('difference,message', [
    (['--batch_size=8'], "batch_size is 8 on process 1 but 4 on process 0"),
    (['--data_root={other}'], "tiny/train.bin is 50,000 bytes on process 1 but 60,050 bytes on process 0"),
], ids=['config', 'data'])
def test_processes_that_disagree_stop_with_the_same_line(difference, message, data_root, other_data_root, script_env,
                                                         tmp_path):
    """Process 1 started with another config value or other data: both say so, before any work."""
    with reserved_port() as port:
        results = finish(start_run(TWO + [f'--data_root={data_root}', f'--out_dir={tmp_path}'], script_env,
                                   [port, port], extra=([], [a.format(other=other_data_root) for a in difference])))
    line = f"error: the processes disagree: {message}: start every process with the same config and data\n"
    assert [(code, err) for code, _, err in results] == [(2, line), (2, line)]
    assert all('number of parameters' not in out for _, out, _ in results) and os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# the decisions, one by one

def test_a_process_is_lost_when_its_beat_stops_or_process_0_when_the_service_does():
    changed = {0: 100.0, 1: 96.0, 2: 99.0}  # when each process's beat last changed
    assert processes.lost_process(0, changed, contact=101.0, now=101.0, timeout=3) == 1
    assert processes.lost_process(0, changed, contact=101.0, now=101.0, timeout=6) is None
    # process 2 has not reached the service for 4 s: process 0, which holds it, is lost, whatever the beats say
    assert processes.lost_process(2, changed, contact=101.0, now=105.0, timeout=3) == 0
    # after its last contact, process 2 cannot know: process 1 was silent 2 s at that time, not 4
    assert processes.lost_process(2, {0: 98.0, 1: 96.0, 2: 99.0}, contact=98.0, now=100.0, timeout=3) is None


def test_who_came_and_with_which_settings():
    me = dict(process=0, processes=4, coordinator='h0:1234')
    came = [me, dict(process=1, processes=4, coordinator='h0:1235'),
            dict(process=3, processes=3, coordinator='h0:1234')]
    assert processes.join_message(60, me, came) == (
        "not every process joined the run within 60 s: 4 processes were expected at h0:1234; process 0 came; "
        "process 1 came to h0:1235; process 3 came expecting 3 processes; process 2 did not: start every process "
        "with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, each with its own JAX_PROCESS_ID")


def test_the_first_difference_is_that_of_the_first_process_that_differs_from_process_0():
    records = [{'a': '1', 'b': '2'}, {'a': '1', 'b': '2'}, {'a': '1', 'b': '3'}, {'a': '4'}]
    assert processes.first_difference(records) == ('b', 2, '3', '2')
    assert processes.first_difference(records[:2]) is None


def test_a_tpu_preemption_notice_stops_the_run_as_sigterm(monkeypatch):
    """Where jax's preemption service runs (a multi-host run; on a Cloud TPU it gets the notice),
    every process stops at the iteration at which it says they all meet."""
    assert processes.stop_signal(7, at_sync_point=True) == 0  # one process: no preemption service
    monkeypatch.setattr(processes.distributed.global_state, 'preemption_sync_manager', object())
    monkeypatch.setattr(processes.multihost_utils, 'reached_preemption_sync_point', lambda step: step == 8)
    assert processes.stop_signal(7, at_sync_point=True) == 0
    assert processes.stop_signal(8, at_sync_point=False) == signal.SIGTERM
