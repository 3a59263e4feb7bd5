"""
^C (SIGINT) and SIGTERM, answered at once whatever the program is doing: waiting on a device, a
compiler or a file. A thread watches for them (Python's own handlers wait for the main thread),
so each signal's line is on stderr at once.

    interrupts.quit_on_signal()      # sampling, a benchmark: the first ^C ends it, exit code 130

    interrupts.quit_on_signal()      # training, until it has something to save
    ...
    interrupts.stop_at_safe_point("the compilation in progress")   # now: stop there, saving
    if interrupts.requested(): save, then interrupts.exit_now(128 + interrupts.requested())

Once a program has a safe point to reach, the first signal only asks it to stop there; the
second ends it at once, after the clean-ups registered with on_quit (a save half-written is
removed, the out_dir's lock released), with exit code 130 (^C) or 143 (SIGTERM), as a shell
reports a process killed by the signal. A program that stopped at its safe point ends with
exit_now(128 + signum), so that a second signal cannot find it halfway through Python's exit.
"""

import os
import signal
import socket
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: '^C', signal.SIGTERM: 'SIGTERM'}

watch = {
    'received': [],  # the signals received, in order
    'safe_point': None,  # what the program stops after, once it has a safe point; None: quit at once
    'who': '',  # 'process 1 of 4: ' in a multi-host run
    'on_quit': [],  # clean-ups before quitting at once
    'thread': None,
}


def quit_on_signal():
    """From now on, the first ^C or SIGTERM ends the program at once: one line, exit 130 or 143."""
    watch['safe_point'] = None
    catch_signals()


def stop_at_safe_point(after):
    """From now on, the first ^C or SIGTERM asks the program to stop after `after` (a phrase: 'the
    iteration in progress'), which it sees with requested(); the second ends it at once. Called
    again, it only says what the program is doing now."""
    if watch['safe_point'] is None:
        catch_signals()
    watch['safe_point'] = after


def requested():
    """The number of the first stop signal received, 0 when none."""
    return watch['received'][0] if watch['received'] else 0


def on_quit(clean_up):
    """Run clean_up() before the program quits at once on a signal."""
    watch['on_quit'].append(clean_up)


def catch_signals():
    """Route SIGINT and SIGTERM to the watching thread (again: jax's preemption service, started
    later, takes SIGTERM for itself)."""
    if watch['thread'] is None:
        receiver, sender = socket.socketpair()
        sender.setblocking(False)
        signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
        watch['thread'] = threading.Thread(target=watch_signals, args=(receiver, sender), daemon=True)
        watch['thread'].start()
        os.register_at_fork(after_in_child=forget_signals)
    for signum in SIGNALS:
        signal.signal(signum, lambda signum, frame: None)  # the wakeup fd tells the thread


def forget_signals():
    """In a forked child (a worker of a multiprocessing pool), which has no watching thread: the
    signals act as by default, so that the pool can end its workers."""
    signal.set_wakeup_fd(-1)
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    watch.update(received=[], thread=None, on_quit=[])


def watch_signals(receiver, sender):
    """The thread's work: one line for each signal, and quitting when it is time. It holds sender,
    the wakeup fd's socket, so that it stays open."""
    while True:
        signum = receiver.recv(1)[0]
        if signum not in SIGNALS:
            continue
        watch['received'].append(signum)
        name = NAMES[signum]
        if len(watch['received']) == 1 and watch['safe_point'] is not None:
            say(f"{name} received: stopping after {watch['safe_point']}, with a checkpoint to resume from; "
                f"{name} again stops at once")
        else:
            quit(signum, f"{name} received: stopped")


def quit(signum, line):
    """Quit the program at once: one line, exit code 128 + signum."""
    say(line)
    exit_now(128 + signum)


def exit_now(code):
    """End the process now, with the clean-ups of on_quit and what it printed flushed, but nothing
    else: a signal during Python's own ending would find no one to answer it."""
    for clean_up in watch['on_quit']:
        try:
            clean_up()
        except Exception:
            pass
    flusher = threading.Thread(target=flush_stdout, daemon=True)  # stdout may be a pipe nobody reads
    flusher.start()
    flusher.join(1)
    os._exit(code)


def flush_stdout():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def say(line):
    """One line on stderr, written at once, whatever the main thread is printing."""
    os.write(2, (watch['who'] + line + '\n').encode())
