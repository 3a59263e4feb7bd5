"""
The processes of a run: joining a multi-host run, agreeing across processes, stopping together
when one fails, is preempted or disagrees.

A multi-host run is one process per host, each driving all its devices, started with the same
command; jax's coordination service, which process 0 holds, connects them.

    init_distributed(join_timeout, process_timeout, out_dir)   # join, then watch the others
    check_same_everywhere(config, data_dir)                    # the same config and data everywhere
    stop = stop_signal(iter_num, at_sync_point)  # SIGTERM, ^C (see interrupts.py), a TPU's preemption notice

When a process fails, the others stop with one line on stderr, each in bounded time:
- a process that does not join within join_timeout seconds (never started, another
  JAX_COORDINATOR_ADDRESS or JAX_NUM_PROCESSES): who was expected and who came, exit code 2;
- processes started with another config or other data: the first difference, exit code 2;
- a process that stops answering for process_timeout seconds (killed, crashed, its host lost or
  frozen): which one, at which iteration, the checkpoint kept, exit code 1. Each process beats
  through the coordination service and a thread of its own watches the others' beats, so this
  holds however long the main thread is blocked: a collective waiting for a dead process may
  never return (NCCL), and is cut short by os._exit.
jax's own runtime aborts a process with pages of logs when it loses the coordination service
(process 0 died) or that service finds a process dead: its logs are silenced in a multi-host
run and its abort is caught to print the line above instead.
"""

import ctypes
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import jax
import jaxlib.utils
from jax._src import distributed  # the coordination service's client: its key-value store
from jax.experimental import multihost_utils

import accelerators
import interrupts


KEYS = 'nanogpt_jax/'  # this program's entries in the coordination service's key-value store
BEATS_PER_TIMEOUT = 10  # a process beats this many times per process_timeout
PER_PROCESS_KEYS = ('data_root', 'compilation_cache')  # where a host keeps its files: may differ between hosts
DATA_FILES = ('train.bin', 'val.bin', 'meta.pkl')  # of a dataset, compared by size across processes
JOINING = 'joining'  # a folder of out_dir: who is joining the run, for the line of a join that fails

# what this process knows of the run, for the lines it prints when the run fails
run = {
    'process': 0, 'processes': 1, 'out_dir': None,
    'joining': None,  # (join_timeout, this process's settings or None, when it started joining)
    'joined': False,
    'timeout': None,  # process_timeout
    'heard': None,  # from the coordination service (see watch): when last, and each process's last beat
    'iter': None,  # the iteration this process is at, from the end of its first one
    'abort_handler': None,  # jax_aborted as a C function, kept alive as long as the process
    'leaving': None,  # the exit code of a stop all processes agreed on (stop_together), once this one said why
}


def fail(message, code):
    """Print the one-line error and end this process now, from any thread: a main thread blocked
    in a collective or in jax's runtime cannot be unwound, and exit handlers would wait for the
    processes that are gone."""
    sys.stdout.flush()
    os.write(2, f"error: {message}\n".encode())
    os._exit(code)


# -----------------------------------------------------------------------------
# joining

def init_distributed(join_timeout, process_timeout, out_dir):
    """Join the other processes of a multi-host run, when there is one, then watch them (see
    watch). Set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on every host, or run under SLURM, Open MPI or on a Cloud TPU VM (TPU chips
    attached, not merely libtpu installed), whose settings jax finds itself. Processes that have not all joined within
    join_timeout seconds stop with one line each (join_failed), exit code 2."""
    env = os.environ
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # used by the CPU backend alone
    if 'JAX_NUM_PROCESSES' in env:
        me = dict(coordinator=env.get('JAX_COORDINATOR_ADDRESS'), processes=int(env['JAX_NUM_PROCESSES']),
                  process=int(env['JAX_PROCESS_ID']))
    elif int(env.get('SLURM_NTASKS', 1)) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', 1)) > 1 \
            or (accelerators.attached() == 'tpu' and jax.config.jax_platforms != 'cpu'):
        me = None
    else:
        return
    run.update(out_dir=out_dir, joining=(join_timeout, me, time.time()))
    silence_jax_runtime()
    if me is not None:
        announce(os.path.join(out_dir, JOINING), me)
    timer = threading.Timer(join_timeout, join_failed)
    timer.daemon = True
    timer.start()
    settings = {} if me is None else dict(coordinator_address=me['coordinator'], num_processes=me['processes'],
                                          process_id=me['process'])
    # jax's own waits are longer than the run's, so that the run's line comes first
    jax.distributed.initialize(**settings, initialization_timeout=join_timeout + 60,
                               heartbeat_timeout_seconds=process_timeout)
    timer.cancel()
    run.update(process=jax.process_index(), processes=jax.process_count(), joined=True)
    if run['processes'] > 1:  # its lines on a signal say which process got it
        interrupts.watch['who'] = f"process {run['process']} of {run['processes']}: "
    if me is not None:
        leave(os.path.join(out_dir, JOINING), me)
    watch(process_timeout)


def announce(folder, me):
    """Leave a note in folder that process me (its process, processes, coordinator) is joining,
    for the others to name who came if the join fails: out_dir is shared by the hosts of a run."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, str(me['process']))
    with open(path + '.tmp', 'w') as f:
        json.dump(me, f)
    os.replace(path + '.tmp', path)


def leave(folder, me):
    """Remove the note of announce, and folder once empty (the last process to join removes it)."""
    os.remove(os.path.join(folder, str(me['process'])))
    try:
        os.rmdir(folder)
    except OSError:  # others have not left theirs yet
        pass


def arrivals(folder, since):
    """The notes of announce in folder written since that time: the processes joining now, or that
    gave up recently; older ones are from earlier runs."""
    notes = []
    names = sorted((n for n in os.listdir(folder) if n.isdigit()), key=int) if os.path.isdir(folder) else []
    for name in names:
        path = os.path.join(folder, name)
        try:
            if os.path.getmtime(path) >= since:
                with open(path) as f:
                    notes.append(json.load(f))
        except (OSError, ValueError):  # removed or rewritten meanwhile
            pass
    return notes


def join_message(join_timeout, me, came):
    """The line of a join that failed: the processes expected by process me (its process,
    processes, coordinator), and those that came (notes of announce), each with the settings that
    differ from me's."""
    if me is None:
        return f"not every process joined the run within {join_timeout} s: check that all were started"
    said = [f"process {other['process']} came"
            + (f" to {other['coordinator']}" if other['coordinator'] != me['coordinator'] else '')
            + (f" expecting {other['processes']} processes" if other['processes'] != me['processes'] else '')
            for other in came]
    missing = sorted(set(range(me['processes'])) - {other['process'] for other in came})
    if missing:
        said.append(f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not")
    return (f"not every process joined the run within {join_timeout} s: {me['processes']} processes were expected "
            f"at {me['coordinator']}; {'; '.join(said)}: start every process with the same JAX_COORDINATOR_ADDRESS "
            f"and JAX_NUM_PROCESSES, each with its own JAX_PROCESS_ID")


def join_failed():
    join_timeout, me, started = run['joining']
    came = [] if me is None else arrivals(os.path.join(run['out_dir'], JOINING), started - join_timeout)
    fail(join_message(join_timeout, me, came), 2)


# -----------------------------------------------------------------------------
# stopping together when a process fails

def silence_jax_runtime():
    """Silence the logs of jax's runtime (its C++ side), and call jax_aborted instead of letting
    it abort the process: it does both when it loses the coordination service or that service
    finds a process dead. Python's own signal handlers run in the main thread only, once it
    returns to Python, which it may never do: the handler is a C function (ctypes), run by the
    thread that aborts. Set JAX_LOGGING_LEVEL to see jax's logs."""
    if 'JAX_LOGGING_LEVEL' not in os.environ:
        jaxlib.utils.absl_set_min_log_level(4)  # above FATAL: none
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
    libc = ctypes.CDLL(None)
    libc.signal.argtypes = (ctypes.c_int, handler_type)
    run['abort_handler'] = handler_type(lambda signum: jax_aborted())
    libc.signal(signal.SIGABRT, run['abort_handler'])


def watch(process_timeout):
    """Beat through the coordination service, and watch the others' beats, on threads of their
    own, while the main thread runs: a process whose beat has not changed for process_timeout
    seconds has stopped answering, and so has process 0, which holds the service, when this
    process cannot reach the service for as long. Either stops this process (stop_lost). An
    uncaught error of the main thread, but ^C, waits for the watch first (wait_for_lost_process),
    so that the lost process is reported rather than the failed collective it caused."""
    client = distributed.global_state.client
    interval = process_timeout / BEATS_PER_TIMEOUT
    start = time.monotonic()
    heard = run['heard'] = {'contact': start, 'changed': {p: start for p in range(run['processes'])}, 'beats': {}}
    run['timeout'] = process_timeout

    def beat():
        try:
            for n in itertools.count():
                if not threading.main_thread().is_alive():  # exiting: no longer a process of the run
                    return
                client.key_value_set(f"{KEYS}alive/{run['process']}", str(n), allow_overwrite=True)
                beats = client.key_value_dir_get(f"{KEYS}alive/")
                now = time.monotonic()
                for key, value in beats:
                    process = int(key.rsplit('/', 1)[1])
                    if heard['beats'].get(process) != value:
                        heard['beats'][process], heard['changed'][process] = value, now
                heard['contact'] = now
                time.sleep(interval)
        except Exception:  # the service is gone: the judge counts the silence
            return

    def judge():
        while threading.main_thread().is_alive():
            time.sleep(interval)
            lost = lost_process(run['process'], heard['changed'], heard['contact'], time.monotonic(), process_timeout)
            if lost is not None:
                stop_lost(lost)

    for target in (beat, judge):
        threading.Thread(target=target, daemon=True).start()
    report_error = sys.excepthook

    def excepthook(kind, error, traceback):
        if not issubclass(kind, KeyboardInterrupt):  # a collective with a process that died fails, in many kinds
            wait_for_lost_process()
        report_error(kind, error, traceback)
    sys.excepthook = excepthook


def most_silent(me, changed, at, silence):
    """The process other than me whose beat last changed (changed: process -> time) longest before
    the time at, if more than silence seconds before; None when all are more recent."""
    others = {p: t for p, t in changed.items() if p != me}
    quietest = min(others, key=lambda p: (others[p], p), default=None)
    return quietest if quietest is not None and at - others[quietest] > silence else None


def lost_process(me, changed, contact, now, timeout):
    """The process that stopped answering as seen by process me at time now, or None: process 0 when
    me has not reached the coordination service, which process 0 holds, since the time contact
    for timeout seconds, else the one whose beat (changed: process -> time it last changed) did
    not change for timeout seconds before that contact: after it, me cannot know."""
    if me != 0 and now - contact > timeout:
        return 0
    return most_silent(me, changed, contact, timeout)


def coordinator_answers(seconds):
    """Whether the coordination service's address takes connections throughout the next seconds: a
    process that dies closes its connections one by one, and its listening socket may be last."""
    host, port = distributed.global_state.coordinator_address.rsplit(':', 1)
    end = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host.strip('[]'), int(port)), timeout=max(end - time.monotonic(), 0.1)).close()
        except OSError:
            return False
        if time.monotonic() > end:
            return True
        time.sleep(seconds / 10)


def jax_aborted():
    """In place of jax's abort (see silence_jax_runtime): while joining, the join failed; after,
    jax lost the coordination service (process 0 is gone) or the service found a process dead,
    which this process's record of the beats names; anything else is a fatal error of its own."""
    if not run['joined']:
        join_failed()
    if run['leaving'] is not None:  # stopping with the others, its line said
        os._exit(run['leaving'])
    if not threading.main_thread().is_alive():  # the program was ending anyway
        os._exit(1)
    heard, interval = run['heard'], run['timeout'] / BEATS_PER_TIMEOUT
    if run['process'] != 0 and not coordinator_answers(interval):
        stop_lost(0)
    lost = most_silent(run['process'], heard['changed'], heard['contact'], 2 * interval)
    if lost is not None:
        stop_lost(lost)
    fail(f"{where()}: jax's runtime stopped process {run['process']} with a fatal error: run it again with "
         f"JAX_LOGGING_LEVEL=WARNING to see it", 134)


def where():
    """The iteration this process is at, in words, for its error lines."""
    return "while starting" if run['iter'] is None else f"iter {run['iter']}"


def kept_checkpoint(out_dir):
    """The checkpoint of out_dir a resume continues from, in words. orbax writes a save under
    another name and renames it to its step once complete."""
    steps = [int(name) for name in os.listdir(out_dir) if name.isdigit()]
    if not steps:
        return "no checkpoint was written: restart every process"
    return f"the last checkpoint in {out_dir!r} (iter {max(steps)}) is kept: restart every process with " \
           f"--init_from=resume"


def stop_lost(process):
    """Stop this process because another one stopped answering: one line, exit code 1."""
    if run['leaving'] is not None:  # stopping with the others, its line said
        os._exit(run['leaving'])
    fail(f"{where()}: process {process} of {run['processes']} stopped answering, so the run stops; "
         f"{kept_checkpoint(run['out_dir'])}", 1)


def wait_for_lost_process():
    """In a multi-host run, give the watch the time to stop this process, should another one have
    stopped answering: an error of the main thread (a collective that failed, a save that did)
    is often only the sign of it. Returns when none did, for the error to be reported."""
    if run['processes'] > 1:
        time.sleep(run['timeout'] * (1 + 2 / BEATS_PER_TIMEOUT))


# -----------------------------------------------------------------------------
# agreeing

def max_over_processes(n):
    """The largest of the numbers n that the processes give (a collective: all of them must call it)."""
    if jax.process_count() == 1:
        return n
    return int(multihost_utils.process_allgather(np.int32(n)).max())


def run_record(config, data_dir):
    """What every process of a run must have alike, as names and values in words: the config but
    the keys that may differ between hosts, the number of processes each was started with, and
    the size of each data file."""
    record = {k: repr(v) for k, v in config.items() if k not in PER_PROCESS_KEYS}
    record['JAX_NUM_PROCESSES'] = os.environ.get('JAX_NUM_PROCESSES', str(jax.process_count()))
    for name in DATA_FILES:
        path = os.path.join(data_dir, name)
        key = f"{os.path.basename(os.path.normpath(data_dir))}/{name}"
        record[key] = f"{os.path.getsize(path):,} bytes" if os.path.exists(path) else "missing"
    return record


def first_difference(records):
    """The first key of records[0] (process 0's) whose value is another in some process's record, with
    that process and both values, as (key, process, value, value of process 0); None if all agree."""
    for process, record in enumerate(records[1:], 1):
        for key, value in records[0].items():
            if record.get(key) != value:
                return key, process, record.get(key, 'missing'), value
    return None


def check_same_everywhere(config, data_dir):
    """Stop every process of a multi-host run with the same line, exit code 2, before any work, unless
    all were started with the same config (a dict of its keys) and data (data_dir's files): the
    processes exchange their run_record through the coordination service."""
    if jax.process_count() == 1:
        return
    client = distributed.global_state.client
    client.key_value_set(f"{KEYS}record/{jax.process_index()}", json.dumps(run_record(config, data_dir)))
    wait_ms = int(run['timeout'] * 1000 * 2)  # the others are a few seconds away at most; a dead one is watched
    records = [json.loads(client.blocking_key_value_get(f"{KEYS}record/{p}", wait_ms))
               for p in range(jax.process_count())]
    difference = first_difference(records)
    if difference is not None:
        key, process, value, value_0 = difference
        stop_together(f"the processes disagree: {key} is {value} on process {process} but {value_0} on process 0: "
                      f"start every process with the same config and data", 2)


def stop_together(message, code):
    """End every process with the same line, which each one reached on its own: each says it and
    tells the others, and process 0, whose exit ends the coordination service, leaves once all have
    said it; a process that then loses the service leaves quietly (see jax_aborted)."""
    run['leaving'] = code
    sys.stdout.flush()
    os.write(2, f"error: {message}\n".encode())
    leave_together(code)


def leave_together(code):
    """End this process with code (see interrupts.exit_now), where all processes end together: each
    tells the others, and process 0, whose exit ends the coordination service, leaves once all have
    told; a process that then loses the service leaves quietly (see jax_aborted)."""
    run['leaving'] = code
    if jax.process_count() > 1:
        client = distributed.global_state.client
        client.key_value_set(f"{KEYS}left/{run['process']}", '1')
        if run['process'] == 0:
            try:
                for p in range(1, run['processes']):
                    client.blocking_key_value_get(f"{KEYS}left/{p}", int(run['timeout'] * 1000 * 2))
            except Exception:  # one is gone without a word: its loss is the judge's, not ours
                pass
    interrupts.exit_now(code)


# -----------------------------------------------------------------------------
# stopping together: SIGTERM, ^C, a TPU's preemption notice

def preempted(iter_num):
    """Whether every process has reached the iteration at which jax's preemption service has them
    all stop, in a multi-host run: it takes a Cloud TPU's preemption notice, and SIGTERM until
    interrupts.stop_at_safe_point does. It must be asked at every iteration."""
    return distributed.global_state.preemption_sync_manager is not None and \
        multihost_utils.reached_preemption_sync_point(iter_num)


def stop_signal(iter_num, at_sync_point):
    """The number of the stop signal received (see interrupts.py), 0 when none, at iteration
    iter_num. With several processes all must stop at the same iteration, so they agree (the signal
    any of them received) at sync points only; a TPU's preemption notice counts as SIGTERM."""
    run['iter'] = iter_num
    if preempted(iter_num):
        return signal.SIGTERM
    if jax.process_count() > 1 and not at_sync_point:
        return 0
    return signal_received()


def signal_received():
    """The stop signal any process received, 0 when none; every process must ask at once."""
    return max_over_processes(interrupts.requested())
