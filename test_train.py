"""Tests of the command lines: configurator.py, train_jax.py, sample_jax.py and plot_jax.py end to
end, torch_vs_jax_examples.py, and test_jax_transformer.py run as a script."""
import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configurator import configure
from conftest import REPO, SHARED, SHAKESPEARE, run_script, start_script, lines, metrics, reserved_port, cpu_devices

# nanoGPT README's command line for a CPU, then a smaller model and run so that the test is quick
NANOGPT_CPU_ARGS = ['config/train_shakespeare_char.py', '--device=cpu', '--compile=False', '--eval_iters=20',
                    '--log_interval=1', '--block_size=64', '--batch_size=12', '--n_layer=4', '--n_head=4',
                    '--n_embd=128', '--max_iters=2000', '--lr_decay_iters=2000', '--dropout=0.0']
SMALL_ARGS = ['--block_size=32', '--batch_size=4', '--n_layer=2', '--n_head=2', '--n_embd=32', '--eval_iters=4',
              '--eval_interval=10', '--gradient_accumulation_steps=2', '--dropout=0.2', '--warmup_iters=5',
              '--lr_decay_iters=30', '--always_save_checkpoint=True']


# -----------------------------------------------------------------------------
# configurator

def test_overrides_parse_like_nanogpt(tmp_path):
    config = {'learning_rate': 6e-4, 'batch_size': 12, 'compile': True, 'dataset': 'openwebtext', 'dtype': 'auto'}
    config_file = tmp_path / 'cfg.py'
    config_file.write_text("batch_size = 64\ndataset = 'shakespeare_char'\n")
    configure(config, [str(config_file), '--learning_rate=1', '--compile=False', '--batch_size=32',
                       '--dtype=bfloat16'])
    del config['__builtins__']  # exec adds it, as in a script's globals
    assert config == {'learning_rate': 1.0, 'batch_size': 32, 'compile': False, 'dataset': 'shakespeare_char',
                      'dtype': 'bfloat16'}
    assert type(config['learning_rate']) is float


def test_every_config_file_sets_keys_of_their_types():
    """The configs of config/ run as nanoGPT's (imports, computed values, one executing another)."""
    from configurator import script_defaults
    for path in sorted(glob.glob(os.path.join(REPO, 'config', '*.py'))):
        config = script_defaults(os.path.join(REPO, 'train_jax.py'))
        cwd = os.getcwd()
        os.chdir(REPO)  # a config file may read another by its path in the repository, as nanoGPT's do
        try:
            configure(config, [path])
        finally:
            os.chdir(cwd)
        assert type(config['batch_size']) is int and type(config['learning_rate']) is float, path


@pytest.mark.parametrize('source, message', [
    ("batch_sise = 64\n", "unknown config key 'batch_sise' (did you mean 'batch_size'?) in config file {path}"),
    ("batch_size = '64'\n", "batch_size = '64' in config file {path}: expected an int like the default 12, got a str"),
    ("import math\n_n = 4\nlearning_rate = math.sqrt(_n)\nmodel = dict(n_layer=_n)\n",
     "unknown config key 'model' in config file {path}"),
])
def test_a_config_file_sets_config_keys_alone(tmp_path, script_env, source, message):
    """A typo or a wrong type in a config file stops train_jax.py as on the command line, one line
    and exit code 2 before any work; modules and names starting with _ are the file's own."""
    path = tmp_path / 'cfg.py'
    path.write_text(source)
    p = run_script('train_jax.py', [str(path)], script_env, check=False)
    assert (p.returncode, p.stderr) == (2, f"error: {message.format(path=path)}\n")


def test_training_and_sampling_from_any_folder(tmp_path, script_env):
    """From the clone's parent (config/... found beside the script, the CPU config finding the one it
    builds on), data in a folder of the working directory; then sampling from yet another folder
    finds the dataset's meta.pkl, the checkpoint holding its data_root as an absolute path, or where
    --data_root says once the data moved."""
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"offline data not found at {SHARED}")
    here, elsewhere = tmp_path / 'here', tmp_path / 'elsewhere'
    os.makedirs(here / 'data' / 'shakespeare_char')
    os.makedirs(elsewhere)
    shutil.copy(SHAKESPEARE, here / 'data' / 'shakespeare_char' / 'input.txt')
    run_script('train_jax.py', ['config/train_shakespeare_char_cpu.py', '--data_root=data', '--out_dir=out',
                                '--n_layer=1', '--n_embd=32', '--n_head=2', '--max_iters=2', '--eval_interval=2',
                                '--eval_iters=2'], script_env, cwd=here)
    sample = ['--device=cpu', f'--out_dir={here / "out"}', '--max_new_tokens=5', '--num_samples=1']
    p = run_script('sample_jax.py', sample, script_env, cwd=elsewhere)
    assert f"Loading meta from {here}/data/shakespeare_char/meta.pkl" in p.stdout
    shutil.move(here / 'data', tmp_path / 'moved')
    p = run_script('sample_jax.py', sample + [f'--data_root={tmp_path / "moved"}'], script_env, cwd=elsewhere)
    assert f"Loading meta from {tmp_path}/moved/shakespeare_char/meta.pkl" in p.stdout


def test_offline_without_the_input_one_line_names_the_command_that_works(tmp_path, script_env):
    """Tiny Shakespeare neither downloaded (no network: a proxy that refuses) nor at hand."""
    os.makedirs(tmp_path / 'shakespeare_char')
    env = dict(script_env, https_proxy='http://127.0.0.1:9', http_proxy='http://127.0.0.1:9')
    p = run_script('train_jax.py', ['config/train_shakespeare_char_cpu.py', f'--data_root={tmp_path}'], env,
                   check=False)
    data = tmp_path / 'shakespeare_char'
    assert p.returncode == 2 and re.fullmatch(
        rf"error: preparing shakespeare_char failed: cannot download \S+ \([^\n]+\); offline, put the file at "
        rf"{re.escape(str(data))}/input.txt or prepare it with `python {re.escape(REPO)}/data/shakespeare_char/"
        rf"prepare.py --input=PATH --out_dir={re.escape(str(data))}`\n", p.stderr), p.stderr


# -----------------------------------------------------------------------------
# end to end: prepare, train, checkpoint, resume, sample

@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """A data folder where shakespeare_char has its input.txt but is not prepared yet."""
    if not os.path.exists(SHAKESPEARE):
        pytest.skip(f"offline data not found at {SHARED} (set NANOGPT_SHARED_DATA)")
    root = tmp_path_factory.mktemp('data')
    os.makedirs(root / 'shakespeare_char')
    shutil.copy(SHAKESPEARE, root / 'shakespeare_char' / 'input.txt')
    return root


@pytest.fixture(scope='module')
def one_go(data_root, tmp_path_factory, script_env):
    """20 iterations in one run, the data prepared on the way."""
    out_dir = tmp_path_factory.mktemp('one_go')
    out = run_script('train_jax.py', NANOGPT_CPU_ARGS + SMALL_ARGS + [f'--data_root={data_root}',
                                                                      f'--out_dir={out_dir}', '--max_iters=20'], script_env)
    return out_dir, out.stdout


def test_training_prepares_data_learns_and_logs_like_nanogpt(one_go, data_root):
    out_dir, stdout = one_go
    assert 'train has 1,003,854 tokens' in stdout  # shakespeare_char was prepared on first use
    assert os.path.exists(data_root / 'shakespeare_char' / 'meta.pkl')
    assert 'tokens per iteration will be: 256' in stdout  # 2 micro-steps x 1 worker x 4 x 32
    assert 'found vocab_size = 65' in stdout
    steps = lines(stdout, 'step ')
    assert [s.split(':')[0] for s in steps] == ['step 0', 'step 10', 'step 20']
    assert re.fullmatch(r'step 0: train loss \d\.\d{4}, val loss \d\.\d{4}', steps[0])
    val = [float(s.split()[-1]) for s in steps]
    assert val[0] > 4.0 and val[2] < val[0] - 0.3  # starts near ln(65) = 4.17 and learns
    iters = lines(stdout, 'iter ')
    assert len(iters) == 21 and re.fullmatch(r'iter 7: loss \d\.\d{4}, time \d+\.\d\dms, mfu -?\d+\.\d\d%, \d+s left', iters[7])
    assert stdout.count('saving checkpoint') == 2  # at iter 10 and 20, never at 0
    # metrics.csv holds every evaluation and log line, with the learning rate, time and MFU
    rows = metrics(out_dir, ('iter', 'loss', 'train_loss', 'val_loss', 'lr', 'time_ms', 'mfu_percent'))
    evals = [(int(r[0]), float(r[2]), float(r[3])) for r in rows if r[3]]
    logged = [(int(r[0]), float(r[1]), float(r[5]), r[6]) for r in rows if r[1]]
    assert [i for i, *_ in evals] == [0, 10, 20] and [i for i, *_ in logged] == list(range(21))
    np.testing.assert_allclose([(t, v) for _, t, v in evals], [numbers(stdout, 'step ')[i] for i in (0, 10, 20)],
                               atol=5e-5)
    np.testing.assert_allclose([loss for _, loss, *_ in logged], [numbers(stdout, 'iter ')[i][0] for i in range(21)],
                               atol=5e-5)
    assert all(ms > 0 for *_, ms, _ in logged) and [mfu != '' for *_, mfu in logged] == [i >= 5 for i in range(21)]
    assert float(rows[0][4]) == pytest.approx(1e-3 / 6, rel=1e-5)  # iter 0 of a 5-iteration warmup to 1e-3


def test_resume_continues_exactly(one_go, data_root, tmp_path, script_env):
    """Stopped at iter 10 and resumed, the run (dropout 0.2) prints the same losses as the run done
    in one go; the resumed run loads the train and eval steps that the first one compiled from the
    compilation cache (--compilation_cache), and compiles them no more."""
    _, stdout = one_go
    cache = tmp_path / 'xla_cache'
    common = NANOGPT_CPU_ARGS + SMALL_ARGS + [f'--data_root={data_root}', f'--out_dir={tmp_path / "out"}',
                                              f'--compilation_cache={cache}']
    env = {k: v for k, v in script_env.items() if k != 'JAX_COMPILATION_CACHE_DIR'}  # the flag alone says where
    loss = lambda ls: [l.split(', time')[0] for l in ls]
    first = run_script('train_jax.py', common + ['--max_iters=10'], env).stdout
    assert loss(lines(first, 'iter ')) == loss(lines(stdout, 'iter ')[:11])
    assert [r[0] for r in metrics(tmp_path / 'out')[-2:]] == ['10', '10']  # evaluated and logged past the checkpoint...
    steps = lambda: {p.name: p.stat().st_mtime_ns for p in cache.glob('jit_*') if p.name.startswith(
        ('jit__train_step-', 'jit_eval_loss_per_device-')) and not p.name.endswith('-atime')}
    compiled = steps()
    assert len(compiled) == 2
    resumed = run_script('train_jax.py', common + ['--max_iters=20', '--init_from=resume'], env).stdout
    assert 'Resuming training from' in resumed
    assert lines(resumed, 'step ') == lines(stdout, 'step ')[1:]
    assert loss(lines(resumed, 'iter ')) == loss(lines(stdout, 'iter ')[10:])
    assert metrics(tmp_path / 'out') == metrics(one_go[0])  # ...rows that the resumed run replaced
    assert steps() == compiled  # the same programs: one compiled again would have been written again


def test_eval_only_and_checkpoint_safety(one_go, data_root, script_env):
    out_dir, stdout = one_go
    before = sorted(os.listdir(out_dir))
    args = NANOGPT_CPU_ARGS + SMALL_ARGS + [f'--data_root={data_root}', f'--out_dir={out_dir}']
    evaluated = run_script('train_jax.py', args + ['--init_from=resume', '--eval_only=True'], script_env).stdout
    assert lines(evaluated, 'step ') == lines(stdout, 'step ')[-1:] and not lines(evaluated, 'iter ')
    # a new run from scratch must not touch the checkpoint that is there
    out = run_script('train_jax.py', args, script_env, check=False)
    assert out.returncode == 2 and 'already holds a checkpoint (iter 20)' in out.stderr
    assert sorted(os.listdir(out_dir)) == before


def test_sample_from_the_checkpoint(one_go, script_env):
    out_dir, _ = one_go
    out = run_script('sample_jax.py', [f'--out_dir={out_dir}', '--device=cpu', '--num_samples=3',
                                       '--max_new_tokens=40', '--start=ROMEO:'], script_env)
    assert 'Loading meta from' in out.stdout
    samples = out.stdout.split('...\n', 1)[1].split('\n---------------\n')
    assert len(samples) == 4 and samples[3] == ''
    for text in samples[:3]:
        assert text.startswith('ROMEO:') and len(text) == len('ROMEO:') + 40


def test_plot_draws_the_loss_curves(one_go, tmp_path, script_env):
    out_dir, _ = one_go
    shutil.copy(os.path.join(out_dir, 'metrics.csv'), tmp_path)
    out = run_script('plot_jax.py', [f'--out_dir={tmp_path}', f'--out_dir={out_dir}'], script_env)  # two runs
    assert out.stdout == f"wrote {tmp_path / 'loss.png'}\n" and not os.path.exists(os.path.join(out_dir, 'loss.png'))
    png = (tmp_path / 'loss.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and png[16:24] == (800).to_bytes(4, 'big') + (550).to_bytes(4, 'big')
    no_matplotlib = subprocess.run([sys.executable, '-c', "import runpy, sys; sys.modules['matplotlib'] = None; "
                                    f"sys.argv = ['plot_jax.py', '--out_dir={out_dir}']; "
                                    "runpy.run_path('plot_jax.py', run_name='__main__')"],
                                   cwd=REPO, capture_output=True, text=True)
    assert no_matplotlib.returncode == 1
    assert no_matplotlib.stderr == "error: plot_jax.py needs matplotlib: pip install matplotlib\n"


def numbers(stdout, prefix):
    """{iteration: the numbers of a log line} of the lines starting with prefix."""
    return {int(l.split()[1].rstrip(':')): [float(n) for n in re.findall(r'loss (\d+\.\d+)', l)]
            for l in lines(stdout, prefix)}


def test_same_losses_on_any_topology_and_resume_across_it(one_go, data_root, tmp_path, script_env):
    """With dropout 0 a run prints the same losses on 1 CPU device as on two processes of 2 devices
    each (jax.distributed, gloo collectives), whose checkpoint resumes on one process with 4 devices
    and FSDP-sharded params, again with the same losses. (one_go first, in any order: the run that
    prepares data_root on first use is one_go's.)"""
    args = NANOGPT_CPU_ARGS + SMALL_ARGS + [f'--data_root={data_root}', '--dropout=0.0']
    one = run_script('train_jax.py', args + [f'--out_dir={tmp_path / "one"}', '--cpu_devices=1', '--max_iters=13'],
                     script_env).stdout
    assert 'devices: 1 x cpu in 1 process(es), 2 micro-step(s) of 4 rows per device' in one
    multi = args + [f'--out_dir={tmp_path / "multi"}']
    with reserved_port() as port:
        procs = [start_script('train_jax.py', multi + ['--max_iters=10'],
                              dict(script_env, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                                   JAX_PROCESS_ID=str(i)))
                 for i in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    log0, log1 = outs[0][0], outs[1][0]
    assert 'devices: 4 x cpu in 2 process(es), 2 micro-step(s) of 1 rows per device' in log0
    assert 'tokens per iteration will be: 256' in log0 and 'tokens per iteration will be: 256' in one
    assert not lines(log1, 'iter ') and not lines(log1, 'step ')  # process 0 alone prints
    resume = ['--init_from=resume', '--max_iters=13', '--fsdp=True', '--fsdp_min_size=512']
    four_devices = dict(script_env, XLA_FLAGS=cpu_devices(4))
    resumed = run_script('train_jax.py', multi + resume, four_devices).stdout
    assert 'devices: 4 x cpu in 1 process(es), 2 micro-step(s) of 1 rows per device, compute dtype float32, FSDP' \
        in resumed
    for prefix in ('iter ', 'step '):
        expected = numbers(one, prefix)
        got = {**numbers(log0, prefix), **numbers(resumed, prefix)}
        assert sorted(got) == sorted(expected)
        np.testing.assert_allclose([got[i] for i in sorted(got)], [expected[i] for i in sorted(got)], atol=1e-4)
    # the samples are split over 4 devices, and are the same as on one
    sample = [f'--out_dir={tmp_path / "multi"}', '--device=cpu', '--num_samples=4', '--max_new_tokens=30']
    on_4 = run_script('sample_jax.py', sample, four_devices).stdout
    on_1 = run_script('sample_jax.py', sample + ['--cpu_devices=1'], script_env).stdout
    assert on_4 == on_1.replace('Overriding: cpu_devices = 1\n', '')
    assert on_4.count('---------------') == 4


# -----------------------------------------------------------------------------
# the other scripts

def test_torch_and_jax_examples_agree(script_env, capsys):
    pytest.importorskip('torch')
    out = run_script('torch_vs_jax_examples.py', [], script_env)
    pairs = out.stdout.splitlines()
    assert len(pairs) == 11 and all(': ok, ' in line for line in pairs), out.stdout
    assert pairs[-1].startswith('topk + multinomial -> Gumbel-max: ok, both draw exactly the top 10')
    # a pair that disagrees says so on its line and fails the script
    import torch_vs_jax_examples as ex
    with pytest.raises(SystemExit) as stopped:
        ex.main([('broken', lambda: ex.close(np.zeros(2), np.ones(2))), ex.PAIRS[0]])
    said = capsys.readouterr().out
    assert stopped.value.code == 1 and said.startswith('broken: MISMATCH: Not equal to tolerance')
    assert said.splitlines()[1].startswith('nn.Linear -> nn.Dense (kernel = weight.T): ok')


def test_the_model_tests_run_as_a_script(script_env, tmp_path):
    """python test_jax_transformer.py runs its tests and prints pytest's summary (two of them here:
    the whole file runs in the suite); without torch, the tests comparing with PyTorch are skipped,
    and the summary says why."""
    out = run_script('test_jax_transformer.py', ['-k', 'test_bias_false_has_no_biases'], script_env)
    assert re.search(r'=+ 1 passed, \d+ deselected in [\d.]+s', out.stdout), out.stdout[-2000:]
    (tmp_path / 'torch.py').write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")  # not installed
    no_torch = dict(script_env, PYTHONPATH=str(tmp_path))
    out = run_script('test_jax_transformer.py', ['-k', 'hugging_face or bias_false'], no_torch)
    assert re.search(r'=+ 1 passed, 2 skipped, \d+ deselected in [\d.]+s', out.stdout), out.stdout[-2000:]
    assert "SKIPPED [2] test_jax_transformer.py:" in out.stdout and "needs torch" in out.stdout
