"""
Save the OpenWebText dataset to binary files for training: GPT-2 BPE tokens,
each document followed by the end-of-text token 50256, as uint16 in
train.bin and val.bin. Output is byte-identical to nanoGPT's
data/openwebtext/prepare.py. See also:
https://github.com/HazyResearch/flash-attention/blob/main/training/src/datamodules/language_modeling_hf.py

$ python data/openwebtext/prepare.py                        # downloads openwebtext (~54GB in the HF cache)
$ python data/openwebtext/prepare.py --input=docs.jsonl     # local JSON lines, each an object with a 'text'
$ python data/openwebtext/prepare.py --input=docs/ --out_dir=/tmp/owt   # a folder of .txt files, one document each

The hub's openwebtext (Skylion007/openwebtext) is a loading script, which datasets >= 4.0 no
longer runs. Then the documents are read from the parquet files the hub converted it to, on the
branch refs/convert/parquet of that repository: the same documents in the same order, so the
same train.bin and val.bin.
"""
import os
import sys
import argparse
import numpy as np
from tqdm import tqdm
from datasets import load_dataset  # huggingface datasets
from datasets.exceptions import DatasetGenerationError

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inputs import die, gpt2_encoding, input_files, check_documents, quit_on_signal  # noqa: E402

# number of worker processes for load_dataset() and .map(); ~ number of cpu cores // 2
num_proc = max(1, (os.cpu_count() or 2) // 2)

# the hub's parquet conversion of openwebtext: one config, plain_text, one split, train
OPENWEBTEXT_PARQUET = 'hf://datasets/Skylion007/openwebtext@refs/convert/parquet/plain_text/train/*.parquet'

enc = gpt2_encoding()


def process(example):
    ids = enc.encode_ordinary(example['text'])  # encode_ordinary ignores any special tokens
    ids.append(enc.eot_token)  # end of text token, 50256 for gpt2 bpe, appended to every document
    return {'ids': ids, 'len': len(ids)}


def load_openwebtext():
    """load_dataset("openwebtext") as in nanoGPT, or where datasets runs no loading scripts, the
    hub's parquet conversion of it."""
    try:
        # about 8M documents (8,013,769)
        return load_dataset("openwebtext", num_proc=num_proc)
    except RuntimeError as e:
        if 'Dataset scripts are no longer supported' not in str(e):
            raise
    print(f"openwebtext is a loading script, which datasets >= 4.0 does not run: reading the hub's parquet "
          f"conversion of it, {OPENWEBTEXT_PARQUET}")
    try:
        return load_dataset("parquet", data_files={'train': OPENWEBTEXT_PARQUET}, num_proc=num_proc)
    except (FileNotFoundError, ValueError) as e:  # no such files: not converted, or the first 5GB only (partial-train/)
        die(f"the hub holds no complete parquet conversion of openwebtext ({str(e).splitlines()[0]}); "
            f"pip install 'datasets<4' to run its loading script, or pass a local copy with --input")


def load(input_path=None):
    if input_path is None:
        try:
            return load_openwebtext()
        except OSError as e:  # no network, and nothing in the HF cache
            die(f"cannot load openwebtext from the Hugging Face hub ({str(e).splitlines()[0]}); "
                f"offline, pass a local copy with --input")
    if os.path.isdir(input_path):
        files = input_files(input_path, ('.txt',))
        return load_dataset("text", data_files={'train': files}, sample_by="document")
    [path] = input_files(input_path, ('.json', '.jsonl'))
    check_documents(path)
    return load_dataset("json", data_files={'train': path})


def prepare(input_path=None, out_dir=None):
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    try:
        dataset = load(input_path)
    except DatasetGenerationError as e:  # a local file that is not what it says
        die(f"cannot read {input_path}: {e.__cause__ or e}")

    # owt only has a 'train' split, so carve out a small val split
    split_dataset = dataset['train'].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset['val'] = split_dataset.pop('test')
    # for openwebtext: train 8,009,762 documents, val 4,007 documents

    tokenized = split_dataset.map(
        process,
        remove_columns=['text'],
        desc="tokenizing the splits",
        num_proc=num_proc,
    )

    # concatenate all the ids of each split into one file
    lengths = {}
    for split, dset in tokenized.items():
        arr_len = np.sum(dset['len'], dtype=np.uint64)
        filename = os.path.join(out_dir, f'{split}.bin')
        # written as .tmp and renamed when complete: a killed run leaves no file that looks complete
        arr = np.memmap(filename + '.tmp', dtype=np.uint16, mode='w+', shape=(arr_len,))  # max token 50256 < 2**16
        # write in contiguous shards (1024 for owt; fewer when there are fewer documents)
        num_shards = min(1024, len(dset))
        idx = 0
        for i in tqdm(range(num_shards), desc=f'writing {filename}'):
            shard = dset.shard(num_shards=num_shards, index=i, contiguous=True).with_format('numpy')
            ids = np.concatenate(shard['ids'])
            arr[idx:idx + len(ids)] = ids
            idx += len(ids)
        arr.flush()
        assert idx == arr_len
        del arr  # closes the memmap before its file is renamed
        os.replace(filename + '.tmp', filename)
        print(f"{split} has {len(dset):,} documents, {int(arr_len):,} tokens")
        lengths[split] = int(arr_len)
    return lengths


if __name__ == '__main__':
    quit_on_signal()  # ^C or SIGTERM: one line, exit code 130 or 143
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--input', default=None, help="local JSON lines with a 'text' in each, or a folder of .txt files (default: download openwebtext)")
    parser.add_argument('--out_dir', default=None, help="where to write train.bin/val.bin (default: next to this script)")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)

# openwebtext: train.bin is ~17GB, val.bin ~8.5MB
# train has ~9B tokens (9,035,582,198)
# val has ~4M tokens (4,434,897)
# to read the bin files later, e.g. with numpy:
# m = np.memmap('train.bin', dtype=np.uint16, mode='r')
