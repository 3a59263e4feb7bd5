"""
What lives in a run's out_dir: the checkpoints (this port's orbax checkpoint, beside it the best
one when a stop wrote it, and nanoGPT's ckpt.pt when that is the newest), train.lock (one training run per out_dir) and metrics.csv (the
loss curves that plot_jax.py draws).

    manager = checkpoint_manager(out_dir)              # opening it for training removes unfinished saves
    save_checkpoint(manager, state, meta)              # meta: model_args, iter_num, best_val_loss, config
    checkpoint = newest_checkpoint(manager)            # what a resume reads; best=True: sampling, export
    params = restore_params(manager, checkpoint, sharding)
"""

import atexit
import contextlib
import csv
import dataclasses
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import threading
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import orbax.checkpoint as ocp

import interrupts
from gpt2_weights import from_pretrained
from jax_transformer import GPTConfig, param_shapes
from jax_train_utils import AdamWState, compiled_for, resolve_dtype, with_sharding
from processes import max_over_processes
from nanogpt_checkpoints import NANOGPT_CHECKPOINT, read_nanogpt_checkpoint

# -----------------------------------------------------------------------------
# writing this port's checkpoints

def checkpoint_manager(out_dir, read_only=False):
    """An orbax CheckpointManager of out_dir's checkpoints (see save_checkpoint). Each save is written
    to a temporary folder and renamed when complete, and the previous one is deleted only then,
    so out_dir always holds a restorable checkpoint, even after a kill -9 during a save; the
    temporary folder such a kill leaves is deleted when the next training run opens out_dir, which
    it holds the lock of (see lock_out_dir). read_only (sampling, export, eval_only) creates and
    deletes nothing, so it leaves a save in progress alone."""
    # orbax's own clean-up runs in a thread that an early exit (a bad flag) would cut off mid-way
    options = ocp.CheckpointManagerOptions(create=not read_only, cleanup_tmp_directories=False)
    if not read_only:
        remove_unfinished_saves(out_dir)
    return ocp.CheckpointManager(os.path.abspath(out_dir), options=options)


def remove_unfinished_saves(out_dir):
    """Remove the temporary folders of saves that did not finish from out_dir."""
    for unfinished in pathlib.Path(out_dir).glob('*.orbax-checkpoint-tmp*'):
        shutil.rmtree(unfinished, ignore_errors=True)


def error_reason(e):
    """What went wrong, in a few words: the system's message for an OSError, also where tensorstore
    reports one inside its own message (os_error_code), else the first sentence of e's message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
        return os.strerror(int(code[1]))
    return (str(e).strip().splitlines() or [''])[0].split('. ')[0][:200].rstrip(':.')


@contextlib.contextmanager
def orbax_silenced():
    """Silence orbax while the block runs: when a read or write fails, each of its threads still in
    flight prints a traceback, through absl's logger, threading.excepthook, the asyncio logger and,
    as orbax's event loops close, sys.excepthook and at exit sys.unraisablehook. When the block
    succeeds they sound again; after a failure they stay silenced for good, as those threads may
    print later: the program then ends with its own one-line error."""
    hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
    sys.excepthook = sys.unraisablehook = threading.excepthook = lambda *args: None
    loggers = [logging.getLogger(name) for name in ('absl', 'asyncio')]
    for logger in loggers:
        logger.disabled = True
    yield
    sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
    for logger in loggers:
        logger.disabled = False


def save_checkpoint(manager, state, meta, keep=None):
    """Save params, optimizer state and the JSON metadata (model_args, iter_num, best_val_loss,
    config; 'stopped' for a stop's checkpoint kept beside the best, see best_step) as separate
    items, so sampling can read the params alone, and wait until the write is complete; then delete
    the other checkpoints but the one of step keep. A run replacing the checkpoint another run left
    in out_dir may save at a lower or the same iter_num: force saves below the latest step; one at
    the very same iter_num must be deleted first, as orbax never writes over a step.
    OSError with the reason in a few words when the write fails (a full disk, lost permissions, an
    I/O error): the unfinished folder is removed where possible and manager.latest_step() is the
    checkpoint out_dir still holds. With several processes, a write that fails on one fails on all:
    the others wait for it at orbax's barrier, which fails too (at orbax's timeout at the latest)."""
    step = meta['iter_num']
    if step in manager.all_steps():
        manager.delete(step)
    try:
        with orbax_silenced():
            manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta)))
            manager.wait_until_finished()  # a failure shows now, not at the next save
        for old in set(manager.all_steps()) - {step, keep}:
            manager.delete(old)
        return
    except Exception as e:  # orbax and tensorstore wrap the system's error in many kinds
        reason = error_reason(e)
    if jax.process_index() == 0:
        remove_unfinished(manager.directory, step)
    manager.reload()  # orbax counted the failed step as saved
    free_abandoned_coroutines()
    raise OSError(reason)


def free_abandoned_coroutines():
    """Free the reads or writes orbax had not started when one of them failed. Left to the
    program's exit, they may print a warning about a coroutine never awaited after the error line."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        gc.collect()


def remove_unfinished(directory, step):
    """Remove the folder of the save of step that failed, where possible. The writes of tensorstore
    still in flight when it failed, which nothing waits for, may create files in it for a few
    milliseconds more: remove it until it has stayed gone for a second, for ten seconds at most."""
    start = removed = time.time()
    while time.time() - removed < 1 and time.time() - start < 10:
        for unfinished in directory.glob(f'{step}.orbax-checkpoint-tmp*'):
            shutil.rmtree(unfinished, ignore_errors=True)
            removed = time.time()
        time.sleep(0.01)


# -----------------------------------------------------------------------------
# reading the newest checkpoint: this port's, or nanoGPT's ckpt.pt

class Checkpoint(NamedTuple):
    """The checkpoint a run of an out_dir continues from."""
    meta: dict  # model_args, iter_num, best_val_loss, config
    step: int | None  # this port's checkpoint, in out_dir/<step>; None for nanoGPT's ckpt.pt
    nanogpt: tuple | None  # (params, (count, mu, nu) or None) read from nanoGPT's ckpt.pt


def checkpoint_time(manager):
    """When the latest checkpoint of manager was written, in nanoseconds (the modification time of
    its folder), or None when there is none."""
    step = manager.latest_step()
    return None if step is None else os.stat(os.path.join(manager.directory, str(step))).st_mtime_ns


def newest_nanogpt_checkpoint(manager):
    """The path of nanoGPT's ckpt.pt in the manager's out_dir when it is the newest checkpoint there
    (newer than this port's latest, or alone), else None: a run handed back and forth between
    nanoGPT and this port goes on from where it was trained last."""
    path = os.path.join(manager.directory, NANOGPT_CHECKPOINT)
    saved = checkpoint_time(manager)
    return path if os.path.isfile(path) and (saved is None or os.stat(path).st_mtime_ns > saved) else None


def restore(manager, step, args):
    """manager.restore of the checkpoint of step; ValueError with a one-line message when it cannot
    be read into args: written for another model or optimizer, or damaged."""
    try:
        with orbax_silenced():
            return manager.restore(step, args=args)
    except Exception as e:  # orbax and tensorstore raise many kinds; the caller ends the program
        reason = f"{type(e).__name__}: {error_reason(e)}"
    free_abandoned_coroutines()
    raise ValueError(f"cannot restore the checkpoint {manager.directory}/{step} ({reason}): it was written for "
                     f"another model or optimizer, or is damaged; start again in another --out_dir")


def newest_checkpoint(manager, with_optimizer=True, nanogpt=True, best=False):
    """The checkpoint a resume, sampling, evaluation or export of the manager's out_dir reads: with
    nanogpt, nanoGPT's ckpt.pt when it is newer than this port's latest checkpoint (or alone; its
    weights are read now, and its optimizer with_optimizer), else this port's latest, or with best
    the one a stop did not write (see best_step). ValueError with a one-line message when out_dir
    holds none, or it cannot be read."""
    path = newest_nanogpt_checkpoint(manager) if nanogpt else None
    if path is not None:
        print(f"reading nanoGPT's checkpoint {path}")
        meta, params, optimizer = read_nanogpt_checkpoint(path, with_optimizer)
        return Checkpoint(meta, None, (params, optimizer))
    step = best_step(manager) if best else manager.latest_step()
    if step is None:
        raise ValueError(f"no checkpoint in out_dir {str(manager.directory)!r}: train one with train_jax.py, or "
                         f"point --out_dir at one")
    return Checkpoint(checkpoint_meta(manager, step), step, None)


def checkpoint_meta(manager, step):
    """The metadata (model_args, iter_num, best_val_loss, config) of the checkpoint of step."""
    return restore(manager, step, ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def best_step(manager, or_newest=True):
    """The step of out_dir's best checkpoint, the one nanoGPT's ckpt.pt would hold: the newest that
    a stop did not write beside it (with always_save_checkpoint=False, a stop keeps the checkpoint
    of the best val loss and writes its own, to resume from), else (or_newest) the newest; None
    when none."""
    steps = sorted(manager.all_steps(), reverse=True)
    return next((step for step in steps if not checkpoint_meta(manager, step).get('stopped')),
                steps[0] if steps and or_newest else None)


def restore_params(manager, checkpoint, sharding):
    """The params of checkpoint (see newest_checkpoint), each array placed by sharding."""
    if checkpoint.nanogpt is not None:
        return jax.device_put(checkpoint.nanogpt[0], sharding)
    abstract_params = param_shapes(GPTConfig(**checkpoint.meta['model_args']))
    abstract_params = with_sharding(abstract_params, jax.tree.map(lambda _: sharding, abstract_params))
    return restore(manager, checkpoint.step, ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))[
        'params']


def restore_train_state(manager, checkpoint, abstract_state, sharding):
    """A train state like abstract_state holding the params and optimizer state of checkpoint (see
    newest_checkpoint), at step iter_num, each array placed by sharding (see
    jax_train_utils.state_sharding), whatever the sharding it was saved with."""
    step = jnp.asarray(checkpoint.meta['iter_num'], jnp.int32)
    if checkpoint.nanogpt is not None:
        params, (count, mu, nu) = checkpoint.nanogpt
        opt_state = AdamWState(count=jnp.asarray(count), mu=mu, nu=nu)
    else:
        abstract_state = with_sharding(abstract_state, sharding)
        restored = restore(manager, checkpoint.step, ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state)))
        params, opt_state = restored['params'], restored['opt_state']
    return jax.device_put(abstract_state.replace(step=step, params=params, opt_state=opt_state), sharding)


def load_params(out_dir, sharding, which='best'):
    """(metadata, GPTConfig, params placed by sharding) of out_dir's best checkpoint (see best_step),
    or with which='latest' its newest, for sampling, evaluation and export. ValueError when there is
    none, or it cannot be read."""
    if which not in ('best', 'latest'):
        raise ValueError(f"checkpoint={which!r}: use 'best' or 'latest'")
    manager = checkpoint_manager(out_dir, read_only=True)
    checkpoint = newest_checkpoint(manager, with_optimizer=False, best=which == 'best')
    return checkpoint.meta, GPTConfig(**checkpoint.meta['model_args']), restore_params(manager, checkpoint, sharding)


def load_model(init_from, out_dir, mesh, dtype, which='best'):
    """(metadata, GPTConfig, params on every device of mesh) of the model that sampling or an
    evaluation runs on the mesh's devices, without dropout, computing in dtype ('auto' as
    resolve_dtype takes it): out_dir's checkpoint `which` when init_from is 'resume' (see
    load_params), else one of OpenAI's GPT-2 or a Hugging Face GPT-2 folder (see
    gpt2_weights.from_pretrained), whose metadata is None. ValueError with a one-line message when
    there is no such model."""
    replicated = NamedSharding(mesh, P())
    if init_from == 'resume':
        meta, config, params = load_params(out_dir, replicated, which)
    else:
        meta, (config, params) = None, from_pretrained(init_from)
        params = jax.device_put(params, replicated)
    # sampling and HellaSwag trace their model for all the rows, which XLA splits
    config = dataclasses.replace(config, dropout=0.0, dtype=resolve_dtype(dtype, mesh), **compiled_for(mesh, False))
    return meta, config, params


# -----------------------------------------------------------------------------
# loss curves: out_dir/metrics.csv, drawn by plot_jax.py

# one row per log line (loss: the iteration's mean training loss), per evaluation (train_loss and
# val_loss over eval_iters batches) and per HellaSwag score; a column a row has no value for is left empty
METRICS_COLUMNS = ['iter', 'loss', 'train_loss', 'val_loss', 'lr', 'time_ms', 'mfu_percent', 'hellaswag_acc',
                   'hellaswag_acc_norm']


def metrics_writer(out_dir, keep_before, until_saved=False):
    """(write, saved): write(iter=..., loss=..., ...) appends one row to out_dir/metrics.csv, numbers
    to 6 digits and None as an empty cell, and flushes it, so that a killed run keeps its rows. The
    file's rows at iterations before keep_before are kept and the later ones dropped: a run resumed
    at iteration keep_before writes those again, so its file ends as if the run had never stopped
    (0: a new file). That happens at the first row, so a run stopped before it (out of memory at
    the first evaluation, say) leaves the file as it was. With until_saved (a run replacing
    another's checkpoint) the rows go to metrics.unsaved.csv until saved() is called, after the
    run's first checkpoint: the out_dir's metrics.csv stays the one of the checkpoint it holds."""
    path = os.path.join(out_dir, 'metrics.csv')
    unsaved = os.path.join(out_dir, 'metrics.unsaved.csv') if until_saved else None
    file = None  # open for appending from the first row on

    def start():
        rows = []
        if keep_before > 0 and os.path.exists(path):
            with open(path, newline='') as f:
                rows = [row for row in csv.DictReader(f) if int(row['iter']) < keep_before]
        target = unsaved or path
        with open(target + '.tmp', 'w', newline='') as f:  # replaced in one go: a kill cannot truncate it
            writer = csv.DictWriter(f, METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(target + '.tmp', target)
        return open(target, 'a', newline='')

    def write(**row):
        nonlocal file
        if file is None:
            file = start()
        csv.DictWriter(file, METRICS_COLUMNS).writerow(
            {k: f'{v:.6g}' if isinstance(v, float) else v for k, v in row.items()})
        file.flush()

    def saved():
        nonlocal unsaved
        if unsaved is not None and os.path.exists(unsaved):  # the open file goes on under its new name
            os.replace(unsaved, path)
        unsaved = None
    return write, saved


# -----------------------------------------------------------------------------
# one training run per out_dir

LOCK_FILE = 'train.lock'  # in out_dir: the host, pid and start time of the run that trains there
LEASE_REFRESH = 60  # seconds between two refreshes of the lock's modification time by its run
LEASE_EXPIRY = 600  # seconds without a refresh after which a lock is stale, wherever its run was


def read_lock(path):
    """The lock at path as {'host', 'pid', 'started', 'age'}, age the seconds since it was last
    refreshed; None when there is no lock, {'age'} alone while its run is still writing it (or if
    it died doing so). ValueError when the lock cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
        age = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot read the lock {path} of another run ({e.strerror}): check its permissions, or "
                         f"choose another --out_dir") from None
    try:
        holder = json.loads(text)
    except ValueError:
        return {'age': age}
    return dict(holder, age=age) if isinstance(holder, dict) else {'age': age}


def process_running(pid):
    """Whether a process with this pid runs on this host, other than this one."""
    if pid == os.getpid():  # a lock naming this process was left by another process with the same pid
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def lock_is_stale(holder):
    """Whether the run of a lock (see read_lock) is gone: a dead pid on this host, or, wherever it
    ran (out_dir on a filesystem that several hosts share), a lease no longer refreshed."""
    if holder['age'] > LEASE_EXPIRY:
        return True
    return holder.get('host') == socket.gethostname() and 'pid' in holder and not process_running(holder['pid'])


def take_lock(out_dir):
    """Make this process the one training run of out_dir: create its lock file, or take over a stale
    one (see lock_is_stale), and refresh the lock's lease until the lock is released, at exit or by
    the returned function. ValueError naming the holder when another run has it."""
    path = os.path.join(out_dir, LOCK_FILE)
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic, on NFS too
            break
        except FileExistsError:
            holder = read_lock(path)
        if holder is None:  # released since
            continue
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
        if not lock_is_stale(holder):
            lease = "" if holder.get('host') == me['host'] else \
                f"; it refreshed its lock {holder['age']:.0f} s ago, which is taken over after {LEASE_EXPIRY} s without"
            raise ValueError(f"out_dir {out_dir!r} is in use by another run ({who}): wait for it to end or stop "
                             f"it, or choose another --out_dir{lease}")
        print(f"taking over the lock of {out_dir!r} from a run that is gone ({who})")
        # two runs taking over the same stale lock in the very same instant could both remove it
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
    stop = threading.Event()

    def refresh():
        while not stop.wait(LEASE_REFRESH):
            try:
                os.utime(path)
            except OSError:  # out_dir unreachable for now: the lease says so
                pass

    def release():
        stop.set()
        holder = read_lock(path)
        if holder is not None and all(holder.get(k) == v for k, v in me.items()):  # not taken over since
            os.remove(path)
    threading.Thread(target=refresh, daemon=True).start()
    atexit.register(release)
    interrupts.on_quit(release)  # a second ^C ends the run without atexit
    return release


def lock_out_dir(out_dir):
    """take_lock on process 0, which writes the checkpoints for all; ValueError on every process
    when another run has out_dir. Take it before opening out_dir's checkpoints: opening deletes the
    unfinished checkpoint folders it finds there, which may be another run's save in progress."""
    refused = ''
    if jax.process_index() == 0:
        try:
            take_lock(out_dir)
        except ValueError as e:
            refused = str(e)
    if max_over_processes(int(bool(refused))) and not refused:
        refused = f"out_dir {out_dir!r} is in use by another run: see the error of process 0"
    if refused:
        raise ValueError(refused)
