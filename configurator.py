"""
Poor Man's Configurator, as in nanoGPT. The scripts call

    configure(globals(), sys.argv[1:])

which reads each argument in order:
$ python train_jax.py config/override_file.py --batch_size=32
a bare argument is a config file, executed in the script's globals (Python, as in nanoGPT: code
by design), whose names must be existing config keys of their defaults' types; a --key=value
argument overrides an existing config key, the value parsed as a Python literal (or kept as a
string) and of the same type as the default (an int is accepted where a float is expected).
Any mistake stops the script with a one-line error and exit code 2, before any work starts.
"""

import ast
import difflib
import os
import signal
import sys
import types
from ast import literal_eval

CONFIG_TYPES = (int, float, bool, str)


def die(message, code=2):
    """Stop the script with a one-line error and exit code 2 (a mistake in what it was given)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def quiet_on_closed_pipe():
    """End the script without a word when what it prints goes to a pipe that was closed
    (`python sample_jax.py | head -3`), as Unix tools do, instead of with a BrokenPipeError."""
    if hasattr(signal, 'SIGPIPE'):  # not on Windows
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def or_die(f, *args):
    """f(*args), or the script stopped with the one line of the ValueError it raised."""
    try:
        return f(*args)
    except ValueError as e:
        die(str(e))


def config_keys(config_globals):
    """The names that can be overridden: the script's int/float/bool/str globals."""
    return [k for k, v in config_globals.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]


def script_defaults(path):
    """{key: default} of the config of a script like train_jax.py: the names it sets, at the top
    level, before it calls configure, to values computed from literals alone (5 * 8, 2 ** 16). So
    that compile_jax.py takes train_jax.py's keys and defaults without a copy of them."""
    with open(path) as f:
        tree = ast.parse(f.read())
    defaults = {}
    for node in config_section(tree):
        try:
            defaults[node.targets[0].id] = eval(compile(ast.Expression(node.value), path, 'eval'), {'__builtins__': {}})
        except Exception:  # not computed from literals alone
            continue
    return {k: v for k, v in defaults.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)}


def config_section(tree):
    """The assignments of one name at the top of a script's syntax tree, before it calls configure."""
    assignments = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, 'id', None) == 'configure':
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            assignments.append(node)
    return assignments


def unknown_key(key, keys):
    close = difflib.get_close_matches(key, keys, n=1)
    return f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def type_name(type_):
    """'an int', 'a float': a type's name with its article."""
    name = type_.__name__
    return f"an {name}" if name[0] in 'aeiou' else f"a {name}"


def of_type(value, default, more_types=()):
    """value as the type of the key's default (an int where a float is expected becomes a float),
    or of more_types; None when it is of another type."""
    if type(default) is float and type(value) is int:
        return float(value)
    return value if type(value) is type(default) or isinstance(value, more_types) else None


def parse_value(key, text, default):
    try:
        value = literal_eval(text)
    except (SyntaxError, ValueError):
        value = text  # a plain string, e.g. --dataset=shakespeare_char
    typed = of_type(value, default)
    if typed is None:
        die(f"--{key}={text}: expected {type_name(type(default))} like the default {default!r}, "
            f"got {type_name(type(value))}")
    return typed


def run_config_file(path, config_globals, more_types, other_keys):
    """Execute the config file in config_globals: Python, as in nanoGPT, which may import and compute
    what it needs (modules, functions and names starting with _ are its own), but whose other names
    must be config keys, of their defaults' types."""
    script_dir = os.path.dirname(os.path.abspath(config_globals.get('__file__', '')))
    if not os.path.exists(path) and os.path.exists(os.path.join(script_dir, path)):
        path = os.path.join(script_dir, path)  # config/... of the script's folder, from anywhere
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        die(f"cannot read config file {path}: {e.strerror}")
    print(f"Overriding config with {path}:")
    print(source)
    keys = config_keys(config_globals)
    defaults, before = {k: config_globals[k] for k in keys}, set(config_globals)
    script_file = config_globals.get('__file__')
    config_globals['__file__'] = path  # as in any Python file: a config file may find its neighbours by it
    try:
        exec(compile(source, path, 'exec'), config_globals)
    except Exception as e:
        line = getattr(e, 'lineno', None)
        where = f"{path}, line {line}" if line else path
        message = e.msg if isinstance(e, SyntaxError) else e  # its str repeats the file and line
        die(f"config file {where}: {type(e).__name__}: {message}")
    finally:
        if script_file is None:
            del config_globals['__file__']
        else:
            config_globals['__file__'] = script_file
    for name, value in list(config_globals.items()):
        if name.startswith('_') or isinstance(value, types.ModuleType) or callable(value):
            continue
        if name in defaults:
            typed = of_type(value, defaults[name], more_types.get(name, ()))
            if typed is None:
                die(f"{name} = {value!r} in config file {path}: expected {type_name(type(defaults[name]))} like "
                    f"the default {defaults[name]!r}, got {type_name(type(value))}")
            config_globals[name] = typed
        elif name not in before and name not in other_keys:
            die(f"{unknown_key(name, keys)} in config file {path}")


def usage(script):
    """The script's command line and config keys, each line of its config as the script has it:
    key = default  # what it is."""
    with open(script) as f:
        source = f.read()
    lines = source.splitlines()
    keys = [lines[node.lineno - 1] for node in config_section(ast.parse(source))
            if not node.targets[0].id.startswith('_')]
    return (f"python {os.path.basename(script)} [config_file.py ...] [--key=value ...]: config files first, then "
            f"overrides, in order; the keys and their defaults:\n" + '\n'.join(keys))


def configure(config_globals, argv, more_types=None, other_keys=()):
    """Apply the config files and --key=value overrides of argv to config_globals. more_types:
    {key: types} a config file may also give a key (a list where the command line takes a string);
    other_keys: names a config file may set that the script does not use (bench_jax.py reads
    train_jax.py's config files). --help (or -h) prints the script's keys and stops."""
    if '--help' in argv or '-h' in argv:
        print(usage(config_globals['__file__']))
        sys.exit(0)
    for arg in argv:
        if not arg.startswith('--'):
            run_config_file(arg, config_globals, more_types or {}, other_keys)
            continue
        if '=' not in arg:
            die(f"{arg}: overrides are written --key=value")
        key, text = arg[2:].split('=', 1)
        keys = config_keys(config_globals)
        if key not in keys:
            die(unknown_key(key, keys))
        value = parse_value(key, text, config_globals[key])
        print(f"Overriding: {key} = {value}")
        config_globals[key] = value
