"""
Prepare FineWeb-Edu (https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu) for training:
GPT-2 BPE tokens, each document preceded by the end-of-text token 50256 as in build-nanogpt's
fineweb.py, as uint16 in train.bin and val.bin, nanoGPT's format (raw tokens, no header).

The val split is every 1000th document, counting from 0 in the order of the source: documents
0, 1000, 2000, ... are val, all others train. Nothing else decides it (not the number of worker
processes), so the same documents always give the same two files.

The documents stream through: read a batch at a time, tokenized in order by a pool of worker
processes, appended to the files through a fixed-size buffer, so memory stays bounded whatever
the size (sample-10BT, ~10B tokens, makes a train.bin of ~20GB). The files are written as
train.bin.tmp and val.bin.tmp and renamed when complete: a killed run leaves no file that looks
complete.

$ python data/fineweb_edu/prepare.py                              # sample-10BT, streamed from the hub
$ python data/fineweb_edu/prepare.py --subset=sample-100BT        # or any other subset of FineWeb-Edu
$ python data/fineweb_edu/prepare.py --input=000_00000.parquet    # a local parquet or JSON lines file, a 'text' in each row
$ python data/fineweb_edu/prepare.py --input=fineweb/ --out_dir=/tmp/fw   # a folder of them, read in name order
"""
import os
import sys
import argparse
import collections
import itertools
import multiprocessing as mp
import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs import die, gpt2_encoding, input_files, check_documents, document_text, quit_on_signal  # noqa: E402

VAL_EVERY = 1000  # document i is in val when i % VAL_EVERY == 0
CHUNK_DOCS = 1024  # documents read, and handed to the worker pool, at a time

enc = gpt2_encoding()


def tokenize(text):
    # <|endoftext|> delimits the documents: build-nanogpt puts it before each one
    return np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint16)  # max token 50256 < 2**16


def local_documents(files):
    """The text of each document of files (parquet or JSON lines), in order."""
    for path in files:
        if path.endswith('.parquet'):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_DOCS, columns=['text']):
                for text in batch.column('text').to_pylist():
                    if text is None:
                        raise ValueError(f"{path}: a row has no text")
                    yield text
        else:
            with open(path, encoding='utf-8') as f:
                for n, line in enumerate(f, 1):
                    yield document_text(line, path, n)


def hub_documents(subset):
    """The text of each document of a subset of FineWeb-Edu, streamed from the hub."""
    from datasets import load_dataset  # huggingface datasets, imported here: local files need only pyarrow
    try:
        dataset = load_dataset("HuggingFaceFW/fineweb-edu", name=subset, split="train", streaming=True)
    except (OSError, ValueError) as e:  # no network, or no such subset
        die(f"cannot stream FineWeb-Edu {subset} from the Hugging Face hub ({str(e).splitlines()[0]}); "
            f"offline, pass local parquet files with --input")
    return (row['text'] for row in dataset)


def tokenized(texts, num_proc):
    """tokenize(text) for each of texts, in order. num_proc processes tokenize a chunk of CHUNK_DOCS
    documents while the one before is written: the pool never holds more than two chunks."""
    if num_proc == 1:  # no pool to feed: tokenize here
        yield from map(tokenize, texts)
        return
    texts = iter(texts)
    chunks = iter(lambda: list(itertools.islice(texts, CHUNK_DOCS)), [])
    with mp.Pool(num_proc) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.map_async(tokenize, chunk))
            if len(pending) == 2:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def prepare(input_path=None, subset='sample-10BT', out_dir=None, num_proc=1, buffer_bytes=1 << 20):
    """Write train.bin and val.bin of the documents of input_path (a file or a folder of files),
    or of the hub's subset, to out_dir, through buffers of buffer_bytes. Returns the number of
    tokens of each split."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    if input_path is None:
        source, texts = f"FineWeb-Edu {subset}", hub_documents(subset)
    else:
        files = input_files(input_path, ('.parquet', '.jsonl'))
        for path in files:
            check_documents(path)
        source, texts = input_path, local_documents(files)
    print(f"val: every {VAL_EVERY}th document of {source} (0, {VAL_EVERY}, {2 * VAL_EVERY}, ...); train: the others")

    paths = {split: os.path.join(out_dir, f'{split}.bin') for split in ('train', 'val')}
    outputs = {split: open(path + '.tmp', 'wb', buffering=buffer_bytes) for split, path in paths.items()}
    documents, tokens = dict.fromkeys(paths, 0), dict.fromkeys(paths, 0)
    try:
        with tqdm(desc=f"tokenizing {source}", unit=' tokens', unit_scale=True) as bar:
            for i, ids in enumerate(tokenized(texts, num_proc)):
                split = 'val' if i % VAL_EVERY == 0 else 'train'
                outputs[split].write(ids)
                documents[split] += 1
                tokens[split] += len(ids)
                bar.update(len(ids))
    except ValueError as e:  # a local file that goes wrong further in
        die(str(e))
    except OSError as e:  # the network, or the disk
        die(f"preparing {source} in {out_dir} failed: {str(e).splitlines()[0]}")
    for split, path in paths.items():
        outputs[split].close()
        os.replace(path + '.tmp', path)
        print(f"{split} has {documents[split]:,} documents, {tokens[split]:,} tokens")
    return tokens


if __name__ == '__main__':
    quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--input', default=None, help="local parquet or JSON lines file with a 'text' in each row, or a folder of them (default: stream FineWeb-Edu from the hub)")
    parser.add_argument('--subset', default='sample-10BT', help="the subset of FineWeb-Edu to stream from the hub (default: sample-10BT)")
    parser.add_argument('--out_dir', default=None, help="where to write train.bin/val.bin (default: next to this script)")
    parser.add_argument('--num_proc', type=int, default=max(1, (os.cpu_count() or 2) // 2), help="tokenizing processes (default: half the cores)")
    args = parser.parse_args()
    if args.num_proc < 1:
        die(f"--num_proc={args.num_proc}: there must be 1 or more tokenizing processes")
    prepare(args.input, args.subset, args.out_dir, args.num_proc)
