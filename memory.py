"""
What fits in the devices' memory, said before any work and after a failure, in one line with what
to try: the bytes a compiled program needs on each device, what a device has free (this
process's, or a GPU or TPU that is not there, for compile_jax.py), and XLA's out of memory errors.
"""

import os
import re

import jax


def memory_advice(where, remat, fsdp, attention, n_devices, resuming):
    """What to try when where ('the training step' or 'evaluation') needs more memory than the
    devices have, among what the run does not do yet: remat helps the training step's backward
    pass alone, fsdp needs several devices, a resumed run keeps its checkpoint's block_size."""
    tries = ["a smaller --batch_size with more --gradient_accumulation_steps (the same tokens per iteration)"]
    if not remat and where == 'the training step':
        tries.append("--remat=True")
    if attention != 'blockwise':
        tries.append("--attention=blockwise")
    if not fsdp and n_devices > 1:
        tries.append("--fsdp=True")
    if not resuming:
        tries.append("a shorter --block_size")
    return ', or '.join(tries)


def size(n):
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def out_of_memory_message(error, where, state_bytes, advice):
    """The one line for XLA's out of memory error in where, 'the training step' or 'evaluation':
    what XLA was allocating, the bytes of params and optimizer state on each device (state_bytes),
    and what to try (see memory_advice)."""
    allocating = re.search(r'allocat\w* (\d+) bytes', str(error))
    hbm = re.search(r'required for HLO temporaries \((\S+)\) exceeds available HBM \((\S+)\)', str(error))  # TPUs, compiling
    if allocating:
        what = f"allocating {size(int(allocating[1]))}"
    elif hbm:
        what = f"temporaries of {hbm[1]}, more than the {hbm[2]} of HBM"
    else:
        what = str(error).strip().splitlines()[0].split('. ')[0]
    return (f"out of memory in {where} ({what}, with {size(state_bytes)} of params and optimizer state per "
            f"device): try {advice}")


def free_memory(device):
    """Bytes a device may still allocate, None where that is unknown: what a GPU or TPU has free; on
    the CPU, the machine's available memory (within the process's address space limit), shared by
    all the process's CPU devices."""
    if device.platform != 'cpu':
        stats = device.memory_stats() or {}
        return stats['bytes_limit'] - stats.get('bytes_in_use', 0) if 'bytes_limit' in stats else None
    try:
        with open('/proc/meminfo') as f:
            free = 1024 * next(int(line.split()[1]) for line in f if line.startswith('MemAvailable:'))
        with open('/proc/self/statm') as f:
            in_use = int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')  # the address space this process holds
    except (OSError, StopIteration, ValueError):  # not Linux
        return None
    import resource  # Unix only
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        free = min(free, limit - in_use)
    return free // jax.local_device_count()


def program_bytes(compiled):
    """Bytes a compiled program needs on each device while it runs, None where XLA does not say:
    its inputs and temporaries, and its outputs that do not reuse a donated input."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes)


def memory_shortage(compiled, where, resident_bytes, advice, device=None, free=None):
    """The one line saying that the compiled program of where ('the training step', 'evaluation'
    or 'sampling') cannot fit in the free memory of each device, before it runs, and what to try
    (see memory_advice); None when it fits, or either figure is unknown. resident_bytes of its
    inputs are on the devices already. The devices are this process's, with free_memory, unless
    given (compile_jax.py: a device that is not there, with its memory)."""
    device = device or jax.local_devices()[0]
    free = free_memory(device) if free is None else free
    need = program_bytes(compiled)
    if need is None or free is None or need - resident_bytes <= free:
        return None
    need -= resident_bytes
    if device.platform == 'cpu':
        n = jax.local_device_count()
        needs = f"{size(n * need)} of memory" + (f" ({n} CPU devices x {size(need)})" if n > 1 else "")
        has = f"the {size(n * free)} available"
    else:
        needs, has = f"{size(need)} on each device", f"the {size(free)} free on a {device.device_kind}"
    if device.platform == 'gpu' and 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in os.environ and need <= free / 0.75 * 0.95:
        advice = (f"XLA_PYTHON_CLIENT_MEM_FRACTION=.95 in the environment (jax takes 75% of a GPU's memory unless "
                  f"told), or {advice}")
    return f"{where} needs {needs}, more than {has}: try {advice}"
