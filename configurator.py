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
import sys
import types
from ast import literal_eval

CONFIG_TYPES = (int, float, bool, str)


def die(message, code=2):
    """Stop the script with a one-line error and exit code 2 (a mistake in what it was given)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


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
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, 'id', None) == 'configure':
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = eval(compile(ast.Expression(node.value), path, 'eval'), {'__builtins__': {}})
            except Exception:  # not computed from literals alone
                continue
    return {k: v for k, v in defaults.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)}


def unknown_key(key, keys):
    close = difflib.get_close_matches(key, keys, n=1)
    return f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


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
        die(f"--{key}={text}: expected a {type(default).__name__} like the default {default!r}, "
            f"got a {type(value).__name__}")
    return typed


def run_config_file(path, config_globals, more_types):
    """Execute the config file in config_globals: Python, as in nanoGPT, which may import and compute
    what it needs (modules, functions and names starting with _ are its own), but whose other names
    must be config keys, of their defaults' types."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        die(f"cannot read config file {path}: {e.strerror}")
    print(f"Overriding config with {path}:")
    print(source)
    keys = config_keys(config_globals)
    defaults, before = {k: config_globals[k] for k in keys}, set(config_globals)
    try:
        exec(compile(source, path, 'exec'), config_globals)
    except Exception as e:
        line = getattr(e, 'lineno', None)
        where = f"{path}, line {line}" if line else path
        message = e.msg if isinstance(e, SyntaxError) else e  # its str repeats the file and line
        die(f"config file {where}: {type(e).__name__}: {message}")
    for name, value in list(config_globals.items()):
        if name.startswith('_') or isinstance(value, types.ModuleType) or callable(value):
            continue
        if name in defaults:
            typed = of_type(value, defaults[name], more_types.get(name, ()))
            if typed is None:
                die(f"{name} = {value!r} in config file {path}: expected a {type(defaults[name]).__name__} like "
                    f"the default {defaults[name]!r}, got a {type(value).__name__}")
            config_globals[name] = typed
        elif name not in before:
            die(f"{unknown_key(name, keys)} in config file {path}")


def configure(config_globals, argv, more_types=None):
    """Apply the config files and --key=value overrides of argv to config_globals. more_types:
    {key: types} a config file may also give a key (a list where the command line takes a string)."""
    for arg in argv:
        if not arg.startswith('--'):
            run_config_file(arg, config_globals, more_types or {})
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
