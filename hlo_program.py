"""
An optimized HLO module (compiled.as_text()) as Python reads it: its computations and
instructions, the bytes of its shapes, and the values of its control flow, run on the host.

    module = Module(compiled.as_text())
    module.instructions(module.entry), module.root(name)
    trip_values(module, loop, initial_state)  # the state at each trip of a while loop

A while loop's trip count is rarely written in the program (a TPU's compiler writes none), and a
loop's bound may be computed anew at each trip of an outer loop (blockwise attention's key blocks
up to the diagonal, which XLA hoists into a table of bounds). Evaluator follows the scalars and
small arrays of numbers that control flow is made of, from constants and loop counters, through
arithmetic, tables, async copies and nested loops; the model's arrays stay unknown (None).
"""

import functools
import json
import math
import re
from dataclasses import dataclass

import numpy as np

DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
               's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'token': 0}
# an array in a shape: dtype, dims and, in its layout, its memory space (S(1): a TPU's on-chip memory)
ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,<=]*)\](\{[^}]*\})?')

MAX_TRIPS = 1_000_000  # a loop that runs longer than this is taken as one of unknown length


def arrays(shape):
    """[(dtype, dims)] of the arrays of a shape string, e.g. '(f32[4,128]{1,0}, s32[])'."""
    return [(dt, [int(d.lstrip('<=')) for d in dims.split(',') if d]) for dt, dims, _ in ARRAY.findall(shape)]


def shape_bytes(shape, memory=False):
    """Bytes of the arrays of a shape; with memory, of those in the device's memory (HBM) only."""
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d.lstrip('<=')) for d in dims.split(',') if d)
               for dt, dims, layout in ARRAY.findall(shape)
               if not (memory and re.search(r'S\([1-9]\d*\)', layout)))


def shape_elements(shape):
    return sum(math.prod(dims) for _, dims in arrays(shape))


@dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list
    attrs: str  # the text after the operands: calls=, condition=, backend_config=, ...
    literal: str  # a constant's value, a parameter's number

    def called(self, key):
        m = re.search(rf'\b{key}=%([\w.\-]+)', self.attrs)
        return m[1] if m else None

    def attribute(self, key):
        """The value of key=value among the attributes, as text, or None."""
        m = re.search(rf'\b{key}=("[^"]*"|[\w\-]+|\{{[^}}]*\}})', self.attrs)
        return m[1] if m else None

    @functools.cached_property
    def small(self):
        return small_array(self.shape)

    @functools.cached_property
    def index(self):
        return int(self.attribute('index'))

    @functools.cached_property
    def constant(self):
        return literal(self.literal, *self.small) if self.small else None

    def backend_config(self):
        start = self.attrs.find('backend_config=')
        if start < 0:
            return {}
        text = self.attrs[start + len('backend_config='):]
        try:
            return json.JSONDecoder().raw_decode(text)[0]
        except ValueError:
            return {}


def closing(text, start):
    """The index just after the bracket that closes the one at text[start]."""
    pairs = {'(': ')', '{': '}', '[': ']'}
    depth, opening = 0, text[start]
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == pairs[opening]:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def parse_instruction(line):
    m = re.match(r'\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*', line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith('('):
        end = closing(rest, 0)
    else:
        end = rest.index(' ')
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r'([\w\-]+)\(', rest)
    if not op:
        return None
    end = closing(rest, op.end() - 1)
    inside = rest[op.end():end - 1]
    operands = re.findall(r'%([\w.\-]+)', inside)
    return Instruction(m[1], shape, op[1], operands, rest[end:], inside if op[1] in ('constant', 'parameter') else '')


class Module:
    """The computations of an HLO module's text: name -> (instructions by name, root name)."""

    def __init__(self, text):
        self.computations, self.entry = {}, None
        self.trips = {}  # (a loop, its initial state) -> trip_values
        name = None
        for line in text.splitlines():
            header = re.match(r'^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$', line)
            if header:
                name = header[2]
                self.computations[name] = ({}, None)
                self.entry = name if header[1] else self.entry
            elif line.startswith('}'):
                name = None
            elif name is not None:
                instruction = parse_instruction(line)
                if instruction:
                    self.computations[name][0][instruction.name] = instruction
                    if line.lstrip().startswith('ROOT'):
                        self.computations[name] = (self.computations[name][0], instruction.name)

    def instructions(self, computation):
        return self.computations[computation][0]

    def root(self, computation):
        instructions, root = self.computations[computation]
        return instructions[root]


# -----------------------------------------------------------------------------
# the host's run of a loop's scalar control flow

SMALL = 4096  # the most elements an array may have for the host to follow its values (tables of loop bounds)
NUMPY_DTYPES = {'pred': np.bool_, 's8': np.int8, 's16': np.int16, 's32': np.int32, 's64': np.int64,
                'u8': np.uint8, 'u16': np.uint16, 'u32': np.uint32, 'u64': np.uint64,
                'f16': np.float32, 'bf16': np.float32, 'f32': np.float32, 'f64': np.float64}


def small_array(shape):
    """(NumPy dtype, dims) of a shape that is one small array of numbers, else None."""
    found = arrays(shape)
    if shape.startswith('(') or len(found) != 1 or found[0][0] not in NUMPY_DTYPES or math.prod(found[0][1]) > SMALL:
        return None
    return NUMPY_DTYPES[found[0][0]], found[0][1]


def literal(text, dtype, dims):
    numbers = re.findall(r'-?[\d.]+(?:e[-+]?\d+)?|true|false|-?inf|nan', text)
    values = [1 if n == 'true' else 0 if n == 'false' else float(n) for n in numbers]
    if len(values) != math.prod(dims):
        return None
    return np.array(values, dtype=np.float64).astype(dtype).reshape(dims)


ELEMENTWISE = {
    'add': np.add, 'subtract': np.subtract, 'multiply': np.multiply, 'maximum': np.maximum, 'minimum': np.minimum,
    'and': np.bitwise_and, 'or': np.bitwise_or, 'xor': np.bitwise_xor, 'shift-left': np.left_shift,
    'shift-right-logical': np.right_shift, 'shift-right-arithmetic': np.right_shift, 'negate': np.negative,
    'abs': np.abs, 'sign': np.sign, 'floor': np.floor, 'ceil': np.ceil, 'select': np.where, 'clamp': lambda lo, x, hi: np.minimum(np.maximum(x, lo), hi),
    'divide': lambda a, b: (np.trunc(a / b) if np.issubdtype(np.result_type(a), np.integer) else a / b),
    'remainder': np.fmod,
    'not': np.invert,  # logical on booleans, bitwise on integers, as and, or, xor
}
COMPARISONS = {'LT': np.less, 'LE': np.less_equal, 'GT': np.greater, 'GE': np.greater_equal, 'EQ': np.equal,
               'NE': np.not_equal}


class Evaluator:
    """Values of one run of a computation given the values of its parameters, as far as the host
    can follow them: scalars and small arrays of numbers (NumPy arrays) and tuples of them, None
    for the rest (the model's arrays, what depends on them)."""

    def __init__(self, module, computation, parameters):
        self.module, self.computation, self.parameters = module, computation, parameters
        self.instructions = module.instructions(computation)
        self.values = {}
        self.reads = set()  # what it read of the parameters: (parameter, tuple index or None for all of it)

    def __call__(self, name):
        if name not in self.values:
            self.values[name] = self.evaluate(self.instructions[name])
        return self.values[name]

    def evaluate(self, ins):
        op = ins.opcode
        if op == 'parameter':
            self.reads.add((parameter_number(ins), None))
            return self.parameters.get(parameter_number(ins))
        if op == 'get-tuple-element':
            index = ins.index
            tuple_of = self.instructions[ins.operands[0]]
            if tuple_of.opcode == 'parameter':  # one element of a parameter
                self.reads.add((parameter_number(tuple_of), index))
                value = self.parameters.get(parameter_number(tuple_of))
            else:
                value = self(ins.operands[0])
            return value[index] if isinstance(value, tuple) and index < len(value) else None
        if op == 'tuple':
            return tuple(self(o) for o in ins.operands)
        if op == 'while':
            states = trip_values(self.module, ins, self(ins.operands[0]))
            return None if states is None else states[-1]
        if op in ('copy-start', 'copy-done'):  # a TPU moving a value between its memories: (to, from, context)
            value = self(ins.operands[0])
            return (value, value, None) if op == 'copy-start' else value[0] if isinstance(value, tuple) else None
        if op in ('fusion', 'call'):
            called = ins.called('calls') or ins.called('to_apply')
            inner = Evaluator(self.module, called, {i: self(o) for i, o in enumerate(ins.operands)})
            return inner(self.module.computations[called][1])
        if ins.small is None:
            return None
        dtype, dims = ins.small
        if op == 'constant':
            return ins.constant
        if op == 'custom-call' and 'AllocateBuffer' in ins.attrs:  # a TPU buffer, filled before it is read
            return np.zeros(dims, dtype)
        if op == 'iota':
            axis = int(re.search(r'iota_dimension=(\d+)', ins.attrs)[1])
            return np.broadcast_to(np.arange(dims[axis]).reshape([-1 if d == axis else 1 for d in range(len(dims))]),
                                   dims).astype(dtype)
        args = [self(o) for o in ins.operands]
        if any(a is None for a in args):
            return None
        with np.errstate(all='ignore'):
            value = self.compute(ins, op, args, dims)
        return None if value is None else np.asarray(value, dtype).reshape(dims)

    def compute(self, ins, op, args, dims):
        if op in ('copy', 'bitcast', 'reshape', 'opt-barrier', 'convert', 'bitcast-convert'):
            return args[0] if op != 'bitcast-convert' else None
        if op == 'broadcast':
            kept = [int(d) for d in re.search(r'dimensions=\{([\d,]*)\}', ins.attrs)[1].split(',') if d]
            shape = [dims[d] if d in kept else 1 for d in range(len(dims))]
            return np.broadcast_to(args[0].reshape(shape), dims)
        if op == 'transpose':
            return np.transpose(args[0], [int(d) for d in re.search(r'dimensions=\{([\d,]*)\}', ins.attrs)[1].split(',')])
        if op == 'slice':
            bounds = re.findall(r'\[(\d+):(\d+)(?::(\d+))?\]', ins.attrs)
            return args[0][tuple(slice(int(a), int(b), int(c or 1)) for a, b, c in bounds)]
        if op == 'dynamic-slice':
            starts = [int(np.clip(int(i), 0, n - d)) for i, n, d in zip(args[1:], args[0].shape, dims)]
            return args[0][tuple(slice(i, i + d) for i, d in zip(starts, dims))]
        if op == 'dynamic-update-slice':
            out, update = args[0].copy(), args[1]
            starts = [int(np.clip(int(i), 0, n - d)) for i, n, d in zip(args[2:], out.shape, update.shape)]
            out[tuple(slice(i, i + d) for i, d in zip(starts, update.shape))] = update
            return out
        if op == 'concatenate':
            return np.concatenate(args, axis=int(re.search(r'dimensions=\{(\d+)\}', ins.attrs)[1]))
        if op == 'compare':
            return COMPARISONS[re.search(r'direction=(\w+)', ins.attrs)[1]](*args)
        if op in ELEMENTWISE:
            return ELEMENTWISE[op](*args)
        return None


def parameter_number(ins):
    """The number of a parameter instruction, parameter(N)."""
    return int(ins.literal) if ins.literal else None


def trip_values(module, loop, state):
    """The successive values of a while loop's state from its initial state: the state each trip
    starts with, then the final state; None when its trip count cannot be known on the host."""
    key = loop.name, comparable(state)
    if key not in module.trips:
        module.trips[key] = run_loop(module, loop, state)
    return module.trips[key]


def run_loop(module, loop, state):
    condition, body = loop.called('condition'), loop.called('body')
    states = []
    while True:
        go = Evaluator(module, condition, {0: state})(module.computations[condition][1])
        if go is None or len(states) > MAX_TRIPS:
            return None
        states.append(state)
        if not go:
            return states
        state = Evaluator(module, body, {0: state})(module.computations[body][1])
        if not isinstance(state, tuple):
            return None


def comparable(value):
    if isinstance(value, tuple):
        return tuple(comparable(v) for v in value)
    if isinstance(value, np.ndarray):
        return value.dtype.str, value.shape, value.tobytes()
    return value
