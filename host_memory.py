"""
The host's memory allocator (glibc's malloc, on Linux) set up for XLA's programs on the CPU:
- use_huge_pages: XLA allocates a program's temporaries afresh at every call, hundreds of MiB for a
  training step, and glibc takes allocations that big straight from the kernel and gives them back
  after the call, so that every step faulted its memory in again 4 KiB at a time (134,000 page
  faults a step at batch 64 x 128: 13-19% of its time, docs/performance.md). Backed by 2 MiB
  transparent huge pages, the same memory takes a few hundred faults.
- release_free_memory: what compiling freed, which glibc keeps for the process unless told.
"""

import ctypes
import os
import sys

HUGE_PAGES = 'glibc.malloc.hugetlb=1'  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on the memory malloc maps


def glibc_version():
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr
        return None
    return tuple(int(n) for n in version.split('.')[:2]) if name == 'glibc' else None


def huge_pages_on_request():
    """Whether the kernel gives transparent huge pages to the memory that asks for them, and only
    that: on kernels set to 'always' every large mapping gets them without asking, on 'never' none."""
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return '[madvise]' in f.read()
    except OSError:
        return False


def huge_pages_settable():
    """Whether glibc can be told to use transparent huge pages here: Linux, glibc 2.35 or later, and
    a kernel that gives them on request."""
    return (sys.platform.startswith('linux') and (glibc_version() or (0, 0)) >= (2, 35)
            and huge_pages_on_request())


def use_huge_pages():
    """Restart this process (the same command line, the same process id) with glibc told to back the
    memory it maps with transparent huge pages, which it reads from GLIBC_TUNABLES only when a process
    starts. Call it first thing in a script: everything before it runs twice. Nothing happens without
    glibc 2.35 or later, when the kernel's huge pages are not on request, or when GLIBC_TUNABLES says
    already what to do with them (glibc.malloc.hugetlb=0 keeps them off)."""
    tunables = os.environ.get('GLIBC_TUNABLES', '')
    if 'glibc.malloc.hugetlb' in tunables or not huge_pages_settable():
        return
    os.environ['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGES}' if tunables else HUGE_PAGES
    sys.stdout.flush()
    os.execv(sys.executable, sys.orig_argv)


def without_huge_pages(env):
    """A copy of the environment env for a process that should run with glibc's default memory
    settings, not use_huge_pages's (a PyTorch contender of bench_jax.py, as nanoGPT runs)."""
    tunables = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t and not t.startswith('glibc.malloc.hugetlb')]
    return dict(env, GLIBC_TUNABLES=':'.join(tunables + ['glibc.malloc.hugetlb=0']))


def release_free_memory():
    """Give the memory that this process has freed, and glibc keeps for later allocations, back to
    the system: after compiling, a few hundred MiB that would otherwise count in the process's peak
    beside the training step's own. Nothing without glibc."""
    if glibc_version() is not None:
        ctypes.CDLL(None).malloc_trim(0)
