"""
Tests for data/*/prepare.py: run each script on the offline copies of its
input (see shared/data/README.md) into a temp dir, and check the output is
byte-identical to what nanoGPT's own prepare.py scripts write; OpenWebText
read from the hub's parquet conversion, FineWeb-Edu against tiktoken run by
hand, and every bad input stopping a script with one line. Nothing here
touches the network.

$ python -m pytest test_data.py -q
"""
import os
import sys
import json
import pickle
import hashlib
import tracemalloc
import subprocess
import importlib.util
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, SHARED, SHAKESPEARE, TIKTOKEN_CACHE, run_script

OWT_JSONL = os.path.join(SHARED, 'owt_sample', 'sample.jsonl')
OWT_TXT = os.path.join(SHARED, 'owt_sample', 'txt')

if not os.path.exists(SHAKESPEARE):
    pytest.skip(f"offline data not found at {SHARED} (set NANOGPT_SHARED_DATA)", allow_module_level=True)

# sha256 of the train.bin/val.bin written by nanoGPT's own data/*/prepare.py
# (karpathy/nanoGPT) on this input: shared/data/tinyshakespeare/input.txt for the
# two shakespeare datasets, and shared/data/owt_sample/sample.jsonl loaded with
# load_dataset("json", ...) in place of load_dataset("openwebtext") for openwebtext
# (with its 1024 write shards capped at the number of documents, which does not change the bytes).
NANOGPT_SHA256 = {
    'shakespeare_char': {
        'train.bin': '6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f',
        'val.bin': 'd37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1',
    },
    'shakespeare': {
        'train.bin': '502a2bdc8210d1ac5d5674867cb74467dd31db575d25cf6dbb08c8bdbea8680f',
        'val.bin': '68a53422394c26a655ebe641f5c6f49888e8f4e45fe5d6f02abda63ba3ebd65b',
    },
    'openwebtext': {
        'train.bin': 'b400f4c62ab69a588bb209ffff95131a41596803dba43d690b3c0e6b9b66f882',
        'val.bin': '295ca9f499bbe86cc4b70e37741c34a8d3bc66018d60fe0ce6a5cbf30c2eac0e',
    },
}
EOT = 50256


def env(tmp_path):
    """The prepare scripts' environment: offline, GPT-2's BPE from the offline cache, the test's own
    Hugging Face cache (the user's stays clean)."""
    return dict(os.environ, TIKTOKEN_CACHE_DIR=TIKTOKEN_CACHE, HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1',
                HF_DATASETS_CACHE=str(tmp_path / 'hf_cache'))


def run_prepare(name, tmp_path, *args):
    return run_script(os.path.join('data', name, 'prepare.py'), args, env(tmp_path)).stdout


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_bins(name, out_dir):
    for fname, digest in NANOGPT_SHA256[name].items():
        assert sha256(os.path.join(out_dir, fname)) == digest, f"{name}/{fname} differs from nanoGPT's"


def load_bin(path):
    # the bins carry no header: raw uint16, so the size is 2 bytes per token
    ids = np.fromfile(path, dtype=np.uint16)
    assert os.path.getsize(path) == 2 * len(ids)
    return ids


def test_shakespeare_char(tmp_path):
    out = tmp_path / 'out'
    stdout = run_prepare('shakespeare_char', tmp_path, f'--input={SHAKESPEARE}', f'--out_dir={out}')
    for line in ["length of dataset in characters: 1,115,394", "vocab size: 65",
                 "train has 1,003,854 tokens", "val has 111,540 tokens"]:
        assert line in stdout
    train, val = load_bin(out / 'train.bin'), load_bin(out / 'val.bin')
    assert len(train) == 1_003_854 and len(val) == 111_540
    check_bins('shakespeare_char', out)

    with open(out / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    with open(SHAKESPEARE, encoding='utf-8') as f:
        text = f.read()
    chars = sorted(set(text))
    assert meta['vocab_size'] == 65 == len(chars)
    assert meta['itos'] == dict(enumerate(chars))
    assert meta['stoi'] == {ch: i for i, ch in enumerate(chars)}
    assert all(meta['stoi'][ch] == i for i, ch in meta['itos'].items())
    decoded = ''.join(meta['itos'][int(i)] for i in np.concatenate([train, val]))
    assert decoded == text
    # the bytes of nanoGPT's prepare.py, whose meta.pkl the scripts read (as data alone: checks.read_meta)
    nanogpt_meta = {'vocab_size': 65, 'itos': {i: ch for i, ch in enumerate(chars)},
                    'stoi': {ch: i for i, ch in enumerate(chars)}}
    assert (out / 'meta.pkl').read_bytes() == pickle.dumps(nanogpt_meta)


def test_shakespeare_bpe(tmp_path):
    out = tmp_path / 'out'
    stdout = run_prepare('shakespeare', tmp_path, f'--input={SHAKESPEARE}', f'--out_dir={out}')
    assert "train has 301,966 tokens" in stdout and "val has 36,059 tokens" in stdout
    assert len(load_bin(out / 'train.bin')) == 301_966
    assert len(load_bin(out / 'val.bin')) == 36_059
    check_bins('shakespeare', out)


def test_default_input_in_out_dir(tmp_path):
    # with no --input, input.txt is read from the output folder (nanoGPT: next to the script)
    # and only downloaded when missing; here it is present, so nothing is downloaded
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'input.txt').write_bytes(open(SHAKESPEARE, 'rb').read())
    stdout = run_prepare('shakespeare_char', tmp_path, f'--out_dir={out}')
    assert 'downloading' not in stdout
    check_bins('shakespeare_char', out)


def import_prepare(name, monkeypatch):
    """data/<name>/prepare.py as a module; the sys.path entries it adds are undone after the test."""
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    spec = importlib.util.spec_from_file_location(f'{name}_prepare', os.path.join(REPO, 'data', name, 'prepare.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_importable_prepare_and_download(tmp_path, monkeypatch):
    mod = import_prepare('shakespeare', monkeypatch)
    # the download helper, pointed at a file:// url instead of github
    from inputs import download
    download('file://' + os.path.abspath(SHAKESPEARE), str(tmp_path / 'input.txt'))
    assert sha256(tmp_path / 'input.txt') == sha256(SHAKESPEARE)
    assert mod.prepare(out_dir=str(tmp_path)) == (301_966, 36_059)
    check_bins('shakespeare', tmp_path)


def gpt2():
    tiktoken = pytest.importorskip('tiktoken')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
        return tiktoken.get_encoding('gpt2')


def owt_texts():
    with open(OWT_JSONL, encoding='utf-8') as f:
        return [json.loads(line)['text'] for line in f]


def encoded_docs(texts):
    enc = gpt2()
    return [tuple(enc.encode_ordinary(t)) + (EOT,) for t in texts]


def split_docs(ids):
    # every document ends with EOT (and Shakespeare text never encodes to EOT itself)
    assert len(ids) and ids[-1] == EOT
    ends = np.flatnonzero(ids == EOT) + 1
    return [tuple(int(x) for x in d) for d in np.split(ids, ends[:-1])]


def check_owt(out, texts, n_train, n_val):
    train, val = load_bin(out / 'train.bin'), load_bin(out / 'val.bin')
    train_docs, val_docs = split_docs(train), split_docs(val)
    assert len(train_docs) == n_train and len(val_docs) == n_val
    # together the two splits hold each document exactly once, tokenized + EOT
    assert sorted(train_docs + val_docs) == sorted(encoded_docs(texts))
    return train, val


def test_openwebtext_jsonl(tmp_path):
    pytest.importorskip('datasets')
    out = tmp_path / 'out'
    run_prepare('openwebtext', tmp_path, f'--input={OWT_JSONL}', f'--out_dir={out}')
    texts = owt_texts()
    assert len(texts) == 301
    # test_size=0.0005 of 301 documents rounds up to 1 val document
    train, val = check_owt(out, texts, 300, 1)
    assert len(train) == 336_875 and len(val) == 1_151
    check_bins('openwebtext', out)


def test_openwebtext_txt_folder(tmp_path):
    pytest.importorskip('datasets')
    out = tmp_path / 'out'
    run_prepare('openwebtext', tmp_path, f'--input={OWT_TXT}', f'--out_dir={out}')
    texts = []
    for fname in sorted(os.listdir(OWT_TXT)):
        with open(os.path.join(OWT_TXT, fname), encoding='utf-8') as f:
            texts.append(f.read())
    assert len(texts) == 20
    check_owt(out, texts, 19, 1)


def write_parquet(path, texts, **columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({'text': texts, **columns}), path, row_group_size=100)


def test_openwebtext_from_the_hubs_parquet_conversion(tmp_path, monkeypatch, capsys):
    # datasets >= 4 refuses the hub's openwebtext, a loading script: the script reads the parquet
    # files of the hub's conversion instead, here local files laid out as on the hub's branch
    datasets = pytest.importorskip('datasets')
    prepare = import_prepare('openwebtext', monkeypatch)
    texts = owt_texts()
    export = tmp_path / 'refs_convert_parquet' / 'plain_text' / 'train'
    write_parquet(str(export / '0000.parquet'), texts[:150])
    write_parquet(str(export / '0001.parquet'), texts[150:])
    calls = []

    def load_dataset(path, **kwargs):
        calls.append(path)
        if path == 'openwebtext':
            raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
        return datasets.load_dataset(path, cache_dir=str(tmp_path / 'hf_cache'), **kwargs)
    monkeypatch.setattr(prepare, 'load_dataset', load_dataset)
    monkeypatch.setattr(prepare, 'OPENWEBTEXT_PARQUET', str(export / '*.parquet'))
    monkeypatch.setattr(prepare, 'num_proc', None)  # datasets forks workers for any number, JAX warns against it
    assert prepare.prepare(out_dir=str(tmp_path / 'out')) == {'train': 336_875, 'val': 1_151}
    assert calls == ['openwebtext', 'parquet']
    assert f"reading the hub's parquet conversion of it, {export}/*.parquet" in capsys.readouterr().out
    # the same bytes as nanoGPT's from the same documents in a local file (test_openwebtext_jsonl)
    check_bins('openwebtext', tmp_path / 'out')
    assert sorted(os.listdir(tmp_path / 'out')) == ['train.bin', 'val.bin']

    # a conversion that is missing, or partial (partial-train/): one line, exit 2
    monkeypatch.setattr(prepare, 'OPENWEBTEXT_PARQUET', str(tmp_path / 'nothing' / '*.parquet'))
    with pytest.raises(SystemExit) as stop:
        prepare.prepare(out_dir=str(tmp_path / 'out2'))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: the hub holds no complete parquet conversion of openwebtext")


# -----------------------------------------------------------------------------
# FineWeb-Edu, on local files in its format

def speeches(n):
    """n short documents of many lengths (the speeches of Tiny Shakespeare, in order), and a few odd ones."""
    texts = [s for t in owt_texts() for s in t.split('\n\n')]
    odd = ['', 'a document that says <|endoftext|> in its text', 'caf\u00e9 \u2014 na\u00efve \U0001f600\n']
    return (odd + texts * (n // len(texts) + 1))[:n]


def fineweb_expected(texts):
    """train.bin and val.bin by hand: tiktoken's tokens of each document after <|endoftext|>,
    documents 0, 1000, 2000, ... in val."""
    enc = gpt2()
    docs = [np.array([EOT] + enc.encode_ordinary(t), dtype=np.uint16) for t in texts]
    return {'train': np.concatenate([d for i, d in enumerate(docs) if i % 1000 != 0]),
            'val': np.concatenate([d for i, d in enumerate(docs) if i % 1000 == 0]),
            'starts': {split: np.cumsum([0] + [len(d) for i, d in enumerate(docs) if (i % 1000 == 0) == (split == 'val')])[:-1]
                       for split in ('train', 'val')}}


def test_fineweb_edu_local_files_any_number_of_workers(tmp_path):
    texts = speeches(2_500)
    source = tmp_path / 'fineweb'
    write_parquet(str(source / '000_00000.parquet'), texts[:1_200], score=[3.0] * 1_200)
    with open(source / '001_00000.jsonl', 'w') as f:
        for text in texts[1_200:]:
            f.write(json.dumps({'text': text, 'id': '<urn:uuid>', 'score': 3.5}) + '\n')
    (source / 'README.md').write_text('not a data file')
    script = os.path.join(REPO, 'data', 'fineweb_edu', 'prepare.py')
    procs = [subprocess.Popen([sys.executable, script, f'--input={source}', f'--out_dir={tmp_path / f"out{n}"}',
                               f'--num_proc={n}'], env=env(tmp_path), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for n in (1, 2)]
    expected = fineweb_expected(texts)
    for n, p in zip((1, 2), procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
        assert f"val: every 1000th document of {source} (0, 1000, 2000, ...); train: the others" in out
        assert f"train has 2,497 documents, {len(expected['train']):,} tokens" in out
        assert f"val has 3 documents, {len(expected['val']):,} tokens" in out
        assert sorted(os.listdir(tmp_path / f'out{n}')) == ['train.bin', 'val.bin']
        for split in ('train', 'val'):
            ids = load_bin(tmp_path / f'out{n}' / f'{split}.bin')
            assert np.array_equal(ids, expected[split]), (n, split)
            # <|endoftext|> begins every document, and is nowhere else
            assert np.array_equal(np.flatnonzero(ids == EOT), expected['starts'][split])


def test_fineweb_edu_memory_stays_bounded(tmp_path, monkeypatch):
    # 5,000 documents, then 20,000: four times the tokens written, and no more memory
    prepare = import_prepare('fineweb_edu', monkeypatch)
    texts = speeches(20_000)
    buffer_bytes = 4096
    peaks, sizes = [], []
    for n in (5_000, 20_000):
        write_parquet(str(tmp_path / f'{n}.parquet'), texts[:n])
        tracemalloc.start()
        try:
            tokens = prepare.prepare(str(tmp_path / f'{n}.parquet'), out_dir=str(tmp_path / f'out{n}'), num_proc=1,
                                     buffer_bytes=buffer_bytes)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        sizes.append(2 * sum(tokens.values()))
    expected = fineweb_expected(texts)
    for split in ('train', 'val'):
        assert np.array_equal(load_bin(tmp_path / 'out20000' / f'{split}.bin'), expected[split])
    assert sizes[1] > 3.5 * sizes[0] and sizes[1] > 400 * buffer_bytes
    # the peak of traced memory does not grow with the data, and is a fraction of what was written
    assert peaks[1] < 1.2 * peaks[0] and peaks[1] < sizes[1] / 4, (peaks, sizes)


# -----------------------------------------------------------------------------
# bad inputs: one line on stderr, exit code 2, whatever the script

NO_NETWORK = 'http://127.0.0.1:9'  # a proxy that refuses every connection


def test_bad_inputs_stop_with_one_line(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'binary.txt').write_bytes(bytes(range(256)))
    (tmp_path / 'page.jsonl').write_text('<html>404 Not Found</html>\n')
    (tmp_path / 'no_text.jsonl').write_text(json.dumps({'content': 'a document'}) + '\n')
    (tmp_path / 'page.parquet').write_text('<html>404 Not Found</html>\n')
    with open(tmp_path / 'broken.jsonl', 'w') as f:  # good for 1,500 lines, then cut short
        for text in speeches(1_500):
            f.write(json.dumps({'text': text}) + '\n')
        f.write('{"text": "cut sh')
    no_network = dict(HTTPS_PROXY=NO_NETWORK, https_proxy=NO_NETWORK, HTTP_PROXY=NO_NETWORK, http_proxy=NO_NETWORK)
    no_tokenizer = dict(no_network, TIKTOKEN_CACHE_DIR=str(tmp_path / 'empty'))
    tokenizer_message = f"cannot load the GPT-2 tokenizer: tiktoken finds its files neither in its cache {tmp_path}/empty"
    out = lambda name: f'--out_dir={tmp_path / name}'
    cases = [  # dataset, args, env, what the error says
        ('shakespeare_char', [out('sc')], no_network, "cannot download https://raw.githubusercontent.com/karpathy/"),
        ('shakespeare_char', [f'--input={tmp_path}/binary.txt', out('sc')], {}, f"{tmp_path}/binary.txt is not UTF-8 text"),
        ('shakespeare', [out('s')], no_network, "cannot download https://raw.githubusercontent.com/karpathy/"),
        ('shakespeare', [f'--input={SHAKESPEARE}', out('s')], no_tokenizer, tokenizer_message),
        ('shakespeare', [f'--input={tmp_path}/empty', out('s')], {}, f"input {tmp_path}/empty is not a file"),
        ('openwebtext', [out('owt')], {}, "cannot load openwebtext from the Hugging Face hub"),
        ('openwebtext', [f'--input={OWT_JSONL}', out('owt')], no_tokenizer, tokenizer_message),
        ('openwebtext', [f'--input={tmp_path}/page.jsonl', out('owt')], {}, f"{tmp_path}/page.jsonl, line 1: not JSON"),
        ('fineweb_edu', [out('fw')], {}, "cannot stream FineWeb-Edu sample-10BT from the Hugging Face hub"),
        ('fineweb_edu', [f'--input={tmp_path}/no_text.jsonl', out('fw')], no_tokenizer, tokenizer_message),
        ('fineweb_edu', [f'--input={tmp_path}/page.parquet', out('fw')], {}, f"{tmp_path}/page.parquet is not a parquet file"),
        ('fineweb_edu', [f'--input={tmp_path}/empty', out('fw')], {},
         f"the folder {tmp_path}/empty holds no .parquet or .jsonl files"),
        ('fineweb_edu', [f'--input={tmp_path}/no_text.jsonl', out('fw')], {},
         f"{tmp_path}/no_text.jsonl, line 1: not a JSON object with a string 'text'"),
    ]
    start = lambda name, args, extra: subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'data', name, 'prepare.py'), *args], env={**env(tmp_path), **extra},
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs = [start(name, args, extra) for name, args, extra, _ in cases]
    # a file that goes wrong further in stops the run there, and leaves no file that looks complete
    broken = start('fineweb_edu', [f'--input={tmp_path}/broken.jsonl', out('broken'), '--num_proc=2'], {})
    for (name, args, _, message), p in zip(cases, procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), \
            (name, args, p.returncode, err)
    _, err = broken.communicate(timeout=300)
    assert broken.returncode == 2 and err.splitlines()[-1] == f"error: {tmp_path}/broken.jsonl, line 1501: not JSON", err
    assert 'Traceback' not in err
    assert not any(name.endswith('.bin') for name in os.listdir(tmp_path / 'broken'))
    for name in ('sc', 's', 'owt', 'fw'):
        assert not os.path.exists(tmp_path / name) or os.listdir(tmp_path / name) == []
