"""host_memory.py: the restart with huge pages, and the freed memory given back, checked against the
kernel's own counters (page faults, resident memory)."""

import os
import subprocess
import sys
import textwrap

import pytest

import host_memory
from conftest import REPO

MiB = 2 ** 20

needs_huge_pages = pytest.mark.skipif(not host_memory.huge_pages_settable(),
                                      reason="transparent huge pages on request (madvise) and glibc >= 2.35")

# a script that says who it is at its start, then touches 64 MiB of malloc'd memory and counts the faults
FAULTS = textwrap.dedent("""
    import ctypes, os, resource, sys
    print('start', os.getpid(), flush=True)
    import host_memory
    host_memory.use_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    n = 64 * 2**20  # glibc maps this straight from the kernel
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(libc.malloc(n), 1, n)
    print('faults', resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, os.getpid(), sys.argv[1:],
          os.environ.get('GLIBC_TUNABLES'))
""")


def run_faults(env):
    p = subprocess.run([sys.executable, '-c', FAULTS, 'an', 'argument'], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    starts = [line.split()[1] for line in p.stdout.splitlines() if line.startswith('start')]
    faults, pid, rest = p.stdout.splitlines()[-1].split(' ', 3)[1:]
    return starts, int(faults), pid, rest


@needs_huge_pages
def test_the_restart_keeps_the_process_and_its_arguments_and_faults_in_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
    starts, faults, pid, rest = run_faults(env)
    assert starts == [pid, pid]  # ran twice, as one process
    assert rest == "['an', 'argument'] glibc.malloc.hugetlb=1"
    assert faults < 64 * MiB // (4096 * 8), faults  # 2 MiB pages: ~32 faults; 4 KiB pages: 16,384

    # the PyTorch side of the bench: glibc as it comes, no restart, a fault every 4 KiB page
    starts, faults, pid, rest = run_faults(host_memory.without_huge_pages(env))
    assert starts == [pid]
    assert rest.endswith('glibc.malloc.hugetlb=0')
    assert faults >= 64 * MiB // 4096 * 0.9, faults


@pytest.mark.skipif(host_memory.glibc_version() is None, reason="glibc's malloc_trim")
def test_release_free_memory_gives_back_what_glibc_kept():
    script = textwrap.dedent("""
        import ctypes, os
        import host_memory
        rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 2**20
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        chunks = [libc.malloc(64 * 1024) for _ in range(4096)]  # 256 MiB, each too small to be mapped alone
        for c in chunks:
            ctypes.memset(c, 1, 64 * 1024)
        for c in chunks[:-1]:  # the last one holds the heap's top: glibc keeps all below it
            libc.free(ctypes.c_void_p(c))
        kept = rss()
        host_memory.release_free_memory()
        print(kept, rss())
    """)
    p = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    kept, released = map(int, p.stdout.split())
    assert kept - released > 200, (kept, released)  # of the 256 MiB freed
