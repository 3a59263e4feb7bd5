"""Tests of checkpoints.py: saving over another run's checkpoint, unfinished saves, the newest of
this port's checkpoint and nanoGPT's ckpt.pt, the out_dir lock's rules, the reasons a write fails.
(Checkpoints written and resumed by train_jax.py are tested end to end in test_train.py and
test_robustness.py; nanoGPT's ckpt.pt in test_nanogpt_checkpoints.py.)"""
import atexit
import json
import os
import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest

import checkpoints


def save(out_dir, iter_num, **meta):
    state = SimpleNamespace(params={'w': np.full(3, float(iter_num))}, opt_state={'m': np.zeros(3)})
    checkpoints.save_checkpoint(checkpoints.checkpoint_manager(out_dir), state, {'iter_num': iter_num, **meta})


def test_a_save_replaces_the_checkpoint_of_another_run_at_any_iteration(tmp_path):
    """What --overwrite_checkpoint relies on: orbax only writes above the latest step and never over
    one, yet the new run's first save replaces the old checkpoint at the same or a lower iteration."""
    for iter_num, run_name in ((12, 'old'), (12, 'new'), (4, 'newer')):
        save(tmp_path, iter_num, run=run_name)  # a new run opens out_dir and saves
        assert os.listdir(tmp_path) == [str(iter_num)]
        manager = checkpoints.checkpoint_manager(tmp_path, read_only=True)
        checkpoint = checkpoints.newest_checkpoint(manager)
        assert checkpoint.meta == {'iter_num': iter_num, 'run': run_name} and checkpoint.step == iter_num


def test_a_training_run_removes_unfinished_saves_before_its_manager_opens(tmp_path):
    """The folders that killed saves leave are gone when checkpoint_manager returns, not later in a
    thread that an early exit (a bad flag) cuts off with a traceback; read-only opening keeps them."""
    save(tmp_path, 3)
    for unfinished in ('4.orbax-checkpoint-tmp', '5.orbax-checkpoint-tmp-1764300000'):  # orbax 0.12 and 0.11 names
        (tmp_path / unfinished).mkdir()
        (tmp_path / unfinished / 'params').write_text('being written')
    assert checkpoints.checkpoint_manager(tmp_path, read_only=True).latest_step() == 3 and len(os.listdir(tmp_path)) == 3
    assert checkpoints.checkpoint_manager(tmp_path).latest_step() == 3 and os.listdir(tmp_path) == ['3']


def test_the_newest_checkpoint_is_read(tmp_path):
    """A run handed back and forth between nanoGPT and this port goes on from where it was trained
    last: nanoGPT's ckpt.pt when it is newer than this port's checkpoint (or alone), else this port's."""
    manager = checkpoints.checkpoint_manager(tmp_path, read_only=True)
    with pytest.raises(ValueError) as none:
        checkpoints.newest_checkpoint(manager)
    assert str(none.value) == f"no checkpoint in out_dir '{tmp_path}': train one with train_jax.py, or point " \
                              f"--out_dir at one"
    (tmp_path / 'ckpt.pt').write_bytes(b'')
    assert checkpoints.newest_nanogpt_checkpoint(manager) == f'{tmp_path}/ckpt.pt'
    save(tmp_path, 7)
    manager = checkpoints.checkpoint_manager(tmp_path, read_only=True)
    saved = checkpoints.checkpoint_time(manager)
    os.utime(tmp_path / 'ckpt.pt', ns=(saved - 10**9, saved - 10**9))
    assert checkpoints.newest_nanogpt_checkpoint(manager) is None
    assert checkpoints.newest_checkpoint(manager).step == 7
    os.utime(tmp_path / 'ckpt.pt', ns=(saved + 10**9, saved + 10**9))
    assert checkpoints.newest_nanogpt_checkpoint(manager) == f'{tmp_path}/ckpt.pt'
    assert checkpoints.newest_checkpoint(manager, nanogpt=False).step == 7  # for export_nanogpt.py


def test_a_failed_write_is_named_by_the_system_error():
    """What a failed save says, whether Python or tensorstore reports the system's error."""
    assert checkpoints.error_reason(PermissionError(13, 'Permission denied', '/out/16')) == 'Permission denied'
    assert checkpoints.error_reason(ValueError('DATA_LOSS: Error writing "h_0/0" in OCDBT database at local file '
                                               '"/out/": Failed writing: [os_error_code=5]')) == 'Input/output error'


# -----------------------------------------------------------------------------
# the lock

NOW = time.time()  # the clock of the lock's ages: frozen, so that a slow machine reads them the same


def write_lock(tmp_path, age, text=None, **holder):
    """A lock file last refreshed `age` seconds before NOW, holding `holder` as JSON or else `text`."""
    lock = tmp_path / checkpoints.LOCK_FILE
    lock.write_text(json.dumps(holder) if text is None else text)
    os.utime(lock, (NOW - age, NOW - age))
    return lock


def take(tmp_path):
    release = checkpoints.take_lock(str(tmp_path))
    atexit.unregister(release)
    return release


def refused(tmp_path):
    """The message of take_lock at NOW, which must refuse the lock."""
    with pytest.MonkeyPatch.context() as m, pytest.raises(ValueError) as e:
        m.setattr(checkpoints.time, 'time', lambda: NOW)
        take(tmp_path)
    return str(e.value)


def test_a_lock_from_another_host_is_taken_over_once_no_longer_refreshed(tmp_path, monkeypatch):
    """out_dir on a filesystem that several hosts share: another host's lock holds while its run
    refreshes it, and is taken over once it has not for LEASE_EXPIRY seconds. The new holder
    refreshes its own, and releases it."""
    lock = write_lock(tmp_path, 30, host='other-host', pid=7, started='2030-01-01 00:00:00')
    assert refused(tmp_path) == f"out_dir '{tmp_path}' is in use by another run (pid 7 on host other-host, " \
        f"started 2030-01-01 00:00:00): wait for it to end or stop it, or choose another --out_dir; it refreshed " \
        f"its lock 30 s ago, which is taken over after 600 s without"
    os.utime(lock, (time.time() - checkpoints.LEASE_EXPIRY - 1,) * 2)
    monkeypatch.setattr(checkpoints, 'LEASE_REFRESH', 0.01)
    release = take(tmp_path)
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    os.utime(lock, (0, 0))
    deadline = time.time() + 60
    while os.path.getmtime(lock) == 0 and time.time() < deadline:  # the refresh thread's next lease
        time.sleep(0.01)
    assert time.time() - os.path.getmtime(lock) < 60
    release()
    assert not lock.exists()


def test_a_lock_on_this_host(tmp_path):
    """On the same host the lock of a live process holds until its lease expires, even with the
    process alive (a hung run); the lock of a dead process, or one naming this very process (left by
    an earlier process that had the same pid, as after a container restart), is taken over at once."""
    holder = dict(host=socket.gethostname(), pid=os.getppid(), started='2030-01-01 00:00:00')
    write_lock(tmp_path, 30, **holder)
    assert refused(tmp_path) == f"out_dir '{tmp_path}' is in use by another run (pid {os.getppid()} on host " \
        f"{holder['host']}, started 2030-01-01 00:00:00): wait for it to end or stop it, or choose another --out_dir"
    write_lock(tmp_path, checkpoints.LEASE_EXPIRY + 1, **holder)
    take(tmp_path)()
    write_lock(tmp_path, 30, **dict(holder, pid=os.getpid()))
    take(tmp_path)()
    assert not (tmp_path / checkpoints.LOCK_FILE).exists()


@pytest.mark.parametrize('text', ['', '{"host": "gpu1", "pi', '[1, 2]'])
def test_a_half_written_lock_holds_until_its_lease_expires(tmp_path, text):
    """A lock its run has not finished writing (or died writing) names nobody: it holds for the
    lease, in case its run is still writing it, then is taken over."""
    write_lock(tmp_path, 30, text=text)
    assert refused(tmp_path) == f"out_dir '{tmp_path}' is in use by another run (pid ? on host ?, started ?): wait " \
        f"for it to end or stop it, or choose another --out_dir; it refreshed its lock 30 s ago, which is taken " \
        f"over after 600 s without"
    write_lock(tmp_path, checkpoints.LEASE_EXPIRY + 1, text=text)
    take(tmp_path)()


def test_a_lock_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    lock = write_lock(tmp_path, 0, host='gpu1', pid=7)

    def denied(path, *args, **kwargs):
        raise PermissionError(13, 'Permission denied', path)
    monkeypatch.setattr(checkpoints, 'open', denied, raising=False)  # as for a user without the right to read it
    assert refused(tmp_path) == f"cannot read the lock {lock} of another run (Permission denied): check its " \
                                f"permissions, or choose another --out_dir"
