"""Tiny Shakespeare, the input of the shakespeare and shakespeare_char datasets."""
import os

from inputs import die, download

DATA_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'


def read_text(input_path, out_dir):
    """The text of input_path, or by default of input.txt in out_dir, downloaded if missing as in nanoGPT."""
    if input_path is None:
        input_path = os.path.join(out_dir, 'input.txt')
        if not os.path.exists(input_path):
            download(DATA_URL, input_path)
    if not os.path.isfile(input_path):
        die(f"input {input_path} is not a file" if os.path.exists(input_path) else f"input file {input_path} not found")
    try:
        with open(input_path, 'r', encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError:
        die(f"{input_path} is not UTF-8 text")
    except OSError as e:
        die(f"cannot read {input_path}: {e.strerror}")
