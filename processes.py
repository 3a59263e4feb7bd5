"""
The processes of a run: joining a multi-host run, agreeing across processes, stopping together
when one fails, is preempted or disagrees.
"""

import importlib.util
import os
import signal

import numpy as np
import jax
from jax.experimental import multihost_utils

# -----------------------------------------------------------------------------
# joining

def init_distributed():
    """Join the other processes of a multi-host run, when there is one. Set JAX_COORDINATOR_ADDRESS
    (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host, or run under
    SLURM, Open MPI or a Cloud TPU VM (libtpu installed), whose settings jax finds itself."""
    env = os.environ
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # used by the CPU backend alone
    if 'JAX_NUM_PROCESSES' in env:
        jax.distributed.initialize(coordinator_address=env.get('JAX_COORDINATOR_ADDRESS'),
                                   num_processes=int(env['JAX_NUM_PROCESSES']),
                                   process_id=int(env['JAX_PROCESS_ID']))
    elif int(env.get('SLURM_NTASKS', 1)) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', 1)) > 1 \
            or importlib.util.find_spec('libtpu') is not None:
        jax.distributed.initialize()


# -----------------------------------------------------------------------------
# agreeing

def max_over_processes(n):
    """The largest of the numbers n that the processes give (a collective: all of them must call it)."""
    if jax.process_count() == 1:
        return n
    return int(multihost_utils.process_allgather(np.int32(n)).max())


# -----------------------------------------------------------------------------
# stopping together: SIGTERM, ^C

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def catch_stop_signals():
    """From now on SIGTERM (a preempted machine) and SIGINT (^C) only ask training to stop: the
    returned list receives the signal's number, and the loop saves a checkpoint after the current
    iteration and exits. A second signal of the same kind acts at once, as it does by default."""
    received = []
    def handler(signum, frame):
        received.append(signum)  # no printing here: the signal may have interrupted a print
        signal.signal(signum, previous[signum])
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    return received


def stop_signal(received, at_sync_point):
    """The number of the stop signal received, 0 when none. With several processes all must stop
    at the same iteration, so they agree (the signal any of them received) at sync points only."""
    if jax.process_count() > 1 and not at_sync_point:
        return 0
    return max_over_processes(received[0] if received else 0)
