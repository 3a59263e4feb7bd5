"""Tests of memory.py: what a compiled program needs against what the devices have, before any
work, and the one line with what to try, for the errors of GPUs and TPUs."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp

import memory


def test_out_of_memory_message_offers_what_the_run_does_not_do_yet():
    """The same line for a GPU's message, which names the size, and a TPU's, which does not; remat
    helps the training step alone, fsdp needs several devices, a resumed run keeps its block_size."""
    gpu = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 25769803776 bytes.")
    advice = memory.memory_advice('the training step', remat=False, fsdp=False, attention='blockwise', n_devices=8,
                                  resuming=False)
    assert memory.out_of_memory_message(gpu, 'the training step', 1_500_000_000, advice) == \
        "out of memory in the training step (allocating 24.0 GiB, with 1.4 GiB of params and optimizer state per " \
        "device): try a smaller --batch_size with more --gradient_accumulation_steps (the same tokens per " \
        "iteration), or --remat=True, or --fsdp=True, or a shorter --block_size"
    tpu = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of 15.48G hbm.")
    advice = memory.memory_advice('evaluation', remat=False, fsdp=False, attention='auto', n_devices=1, resuming=True)
    assert memory.out_of_memory_message(tpu, 'evaluation', 500 * 2**20, advice) == \
        "out of memory in evaluation (RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm, with 500.0 MiB of " \
        "params and optimizer state per device): try a smaller --batch_size with more " \
        "--gradient_accumulation_steps (the same tokens per iteration), or --attention=blockwise"
    # a TPU's compiler refuses a program that cannot fit before it runs
    compiling = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
                             "memory required for HLO temporaries (64.28G) exceeds available HBM (15.75G). HLO "
                             "module: jit__train_step.")
    assert memory.out_of_memory_message(compiling, 'the training step', 17 * 2**30, 'less') == \
        "out of memory in the training step (temporaries of 64.28G, more than the 15.75G of HBM, with 17.0 GiB " \
        "of params and optimizer state per device): try less"


def donating_program():
    """A compiled program that writes over its donated first input, with temporaries."""
    a, b = jnp.ones((256, 256)), jnp.ones((512, 512))
    return jax.jit(lambda a, b: (a + 1, jnp.tanh(b @ b) @ b), donate_argnums=0).lower(a, b).compile(), a, b


def test_memory_is_predicted_from_the_compiled_program(monkeypatch):
    """What a compiled program needs beyond what is on the devices already: its temporaries, its
    other inputs, and its outputs that do not reuse a donated input; compared with the free memory."""
    program, a, b = donating_program()
    stats = program.memory_analysis()
    assert stats.argument_size_in_bytes == a.nbytes + b.nbytes and stats.alias_size_in_bytes == a.nbytes
    # a is on the device already and written over in place; b, the temporaries and b's size of result are not
    need = b.nbytes + stats.temp_size_in_bytes + stats.output_size_in_bytes - a.nbytes
    assert stats.temp_size_in_bytes > 0 and stats.output_size_in_bytes >= a.nbytes + b.nbytes
    monkeypatch.setattr(memory, 'free_memory', lambda device: need)
    assert memory.memory_shortage(program, 'the training step', a.nbytes, 'less') is None
    monkeypatch.setattr(memory, 'free_memory', lambda device: need - 1)
    n = jax.local_device_count()
    assert memory.memory_shortage(program, 'the training step', a.nbytes, 'less') == \
        f"the training step needs {memory.size(n * need)} of memory, more than the {memory.size(n * (need - 1))} " \
        f"available: try less"


def test_a_device_that_is_not_here_is_given_with_its_memory(monkeypatch):
    """compile_jax.py's case: the device and its memory are the target's. On a GPU, where jax takes
    75% of the memory unless told, asking for more is the first thing to try, where it would do."""
    program, a, b = donating_program()
    need = memory.program_bytes(program)
    tpu = SimpleNamespace(platform='tpu', device_kind='TPU v5 lite')
    assert memory.memory_shortage(program, 'evaluation', 0, 'less', tpu, need) is None
    assert memory.memory_shortage(program, 'evaluation', 0, 'less', tpu, need - 2**20) == \
        f"evaluation needs {memory.size(need)} on each device, more than the {memory.size(need - 2**20)} free on a " \
        f"TPU v5 lite: try less"
    gpu = SimpleNamespace(platform='gpu', device_kind='NVIDIA A100-SXM4-40GB')
    monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
    assert memory.memory_shortage(program, 'evaluation', 0, 'less', gpu, need * 0.9).endswith(
        "try XLA_PYTHON_CLIENT_MEM_FRACTION=.95 in the environment (jax takes 75% of a GPU's memory unless told), "
        "or less")
    assert memory.memory_shortage(program, 'evaluation', 0, 'less', gpu, need * 0.5).endswith("try less")
    monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '.9')
    assert memory.memory_shortage(program, 'evaluation', 0, 'less', gpu, need * 0.9).endswith("try less")
