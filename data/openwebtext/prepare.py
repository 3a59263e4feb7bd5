"""
Save the OpenWebText dataset to binary files for training: GPT-2 BPE tokens,
each document followed by the end-of-text token 50256, as uint16 in
train.bin and val.bin. Output is byte-identical to nanoGPT's
data/openwebtext/prepare.py. See also:
https://github.com/HazyResearch/flash-attention/blob/main/training/src/datamodules/language_modeling_hf.py

$ python data/openwebtext/prepare.py                        # downloads openwebtext (~54GB in the HF cache)
$ python data/openwebtext/prepare.py --input=docs.jsonl     # local json/jsonl with a 'text' column
$ python data/openwebtext/prepare.py --input=docs/ --out_dir=/tmp/owt   # a folder of .txt files, one document each
"""
import os
import glob
import argparse
import numpy as np
import tiktoken
from tqdm import tqdm
from datasets import load_dataset  # huggingface datasets

# number of worker processes for load_dataset() and .map(); ~ number of cpu cores // 2
num_proc = max(1, (os.cpu_count() or 2) // 2)

enc = tiktoken.get_encoding("gpt2")


def process(example):
    ids = enc.encode_ordinary(example['text'])  # encode_ordinary ignores any special tokens
    ids.append(enc.eot_token)  # end of text token, 50256 for gpt2 bpe, appended to every document
    return {'ids': ids, 'len': len(ids)}


def load(input_path=None):
    if input_path is None:
        # about 8M documents (8,013,769)
        return load_dataset("openwebtext", num_proc=num_proc)
    if os.path.isdir(input_path):
        files = sorted(glob.glob(os.path.join(input_path, '*.txt')))
        assert files, f"no .txt files in {input_path}"
        return load_dataset("text", data_files={'train': files}, sample_by="document")
    return load_dataset("json", data_files={'train': input_path})


def prepare(input_path=None, out_dir=None):
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    dataset = load(input_path)

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
        arr = np.memmap(filename, dtype=np.uint16, mode='w+', shape=(arr_len,))  # max token 50256 < 2**16
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
        print(f"{split} has {len(dset):,} documents, {int(arr_len):,} tokens")
        lengths[split] = int(arr_len)
    return lengths


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--input', default=None, help="local .json/.jsonl file with a 'text' column, or a folder of .txt files (default: download openwebtext)")
    parser.add_argument('--out_dir', default=None, help="where to write train.bin/val.bin (default: next to this script)")
    args = parser.parse_args()
    prepare(args.input, args.out_dir)

# openwebtext: train.bin is ~17GB, val.bin ~8.5MB
# train has ~9B tokens (9,035,582,198)
# val has ~4M tokens (4,434,897)
# to read the bin files later, e.g. with numpy:
# m = np.memmap('train.bin', dtype=np.uint16, mode='r')
