"""
What the data/*/prepare.py scripts read: files they download once, local files of documents, and
the GPT-2 tokenizer. Anything missing, unreachable or unreadable stops a script with one line on
stderr, `error: ...`, and exit code 2 (configurator.die), never a traceback.
"""
import json
import os
import sys
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import die  # noqa: E402
from checks import gpt2_encoding  # noqa: E402,F401  the prepare scripts' tokenizer
from interrupts import quit_on_signal  # noqa: E402,F401  a prepare script's ^C: one line, exit code 130


def download(url, path):
    """Download url to path. It is written to a temp file first, so that an interrupted download
    leaves nothing behind."""
    print(f"downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url) as r:
            data = r.read()
    except OSError as e:
        die(f"cannot download {url} ({e}); offline, put the file at {path} or pass --input=PATH")
    with open(path + '.tmp', 'wb') as f:
        f.write(data)
    os.replace(path + '.tmp', path)


def input_files(path, extensions):
    """The input files that path names, whose names end with one of extensions (a tuple): [path]
    for a file, the matching files of a folder sorted by name."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(extensions))
        if not files:
            die(f"the folder {path} holds no {' or '.join(extensions)} files")
        return files
    if not os.path.exists(path):
        die(f"input {path} not found")
    if not path.endswith(extensions):
        die(f"input {path} is not a {' or '.join(extensions)} file")
    return [path]


def document_text(line, path, n):
    """The 'text' of line n of the JSON lines file path; ValueError saying where it is not one."""
    try:
        document = json.loads(line)
    except ValueError:
        raise ValueError(f"{path}, line {n}: not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get('text'), str):
        raise ValueError(f"{path}, line {n}: not a JSON object with a string 'text'")
    return document['text']


def check_documents(path):
    """Stop unless path begins like a file of documents: a parquet file with a string column
    'text', or JSON lines whose first line is an object with a string 'text'. The rest of the
    file is checked as it is read."""
    try:
        if path.endswith('.parquet'):
            schema = pq.read_schema(path)
            if 'text' not in schema.names or schema.field('text').type not in (pa.string(), pa.large_string()):
                die(f"{path} has no string column 'text'")
            return
        with open(path, encoding='utf-8') as f:
            document_text(f.readline(), path, 1)
    except UnicodeDecodeError:
        die(f"{path} is not UTF-8 text")
    except pa.ArrowInvalid as e:
        die(f"{path} is not a parquet file: {e}")
    except ValueError as e:
        die(str(e))
    except OSError as e:
        die(f"cannot read {path}: {e.strerror or e}")
