"""
What a compiled program does each time it runs, read from its optimized HLO (compiled.as_text()):
FLOPs, bytes of memory traffic, kernels and collectives, every loop counted at its trip count.

    costs = program_costs(compiled.as_text())
    costs.flops, costs.bytes, costs.kernels, costs.collectives, costs.loops_uncounted

XLA's own cost analysis (compiled.cost_analysis()) counts the body of a while loop once, whatever
its trip count, and gives nothing for GPUs compiled without the hardware. Here each loop's trip
count comes from running the loop's scalar control flow (its counter, its bound, what computes
them) on the host, so that the micro-step scan counts gradient_accumulation_steps times and a loop
whose bound changes from one trip to the next (blockwise attention's key blocks up to the
diagonal) counts each trip. The per-instruction model follows XLA's: a dot or convolution is 2
FLOPs per multiply-add, an elementwise op 1 FLOP per element (exp, log and the like count as
transcendentals instead), and memory traffic is what each kernel (a fusion, a library call, a
copy, a collective) reads and writes, fused intermediates excluded.
"""

import math
import re
from dataclasses import dataclass, field

import numpy as np

from hlo_program import Module, Evaluator, arrays, comparable, parameter_number, shape_bytes, shape_elements, \
    trip_values

# ops that move no data and run no kernel of their own
FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'conditional', 'call',
        'after-all', 'add-dependency', 'opt-barrier', 'partition-id', 'replica-id', 'domain', 'iota'}
# custom calls that move no data: a TPU's views of slices as one array, buffers it allocates, hints
FREE_CALLS = {'ConcatBitcast', 'AllocateBuffer', 'AssumeGatherIndicesInBound'}
TRANSCENDENTAL = {'exponential', 'exponential-minus-one', 'log', 'log-plus-one', 'tanh', 'logistic', 'erf',
                  'sqrt', 'rsqrt', 'cbrt', 'power', 'sine', 'cosine', 'tan', 'atan2'}
# elementwise and reducing ops that XLA counts as one FLOP per element
ARITHMETIC = {'add', 'subtract', 'multiply', 'divide', 'remainder', 'maximum', 'minimum', 'negate', 'abs',
              'compare', 'select', 'clamp', 'and', 'or', 'xor', 'not', 'sign', 'floor', 'ceil',
              'round-nearest-even', 'round-nearest-afz', 'is-finite', 'shift-left', 'shift-right-logical',
              'shift-right-arithmetic'}
COLLECTIVES = {'all-reduce': 'all_reduce', 'all-gather': 'all_gather', 'reduce-scatter': 'reduce_scatter',
               'all-to-all': 'all_to_all', 'collective-permute': 'collective_permute'}


@dataclass
class Costs:
    flops: float = 0.0
    transcendentals: float = 0.0
    bytes: float = 0.0  # read and written by the kernels, as XLA's cost analysis counts them
    memory_bytes: float = 0.0  # of those, to and from the device's memory (HBM), not a TPU's on-chip memory
    kernels: int = 0  # kernel launches (meaningful for GPUs)
    collectives: dict = field(default_factory=dict)  # kind -> count
    collective_bytes: float = 0.0  # what the collectives send and receive
    in_loop: int = 0  # collectives run inside a loop (e.g. once per micro-step)
    loops_uncounted: int = 0  # loops whose trip count could not be known: their bodies are counted once
    by_source: dict = field(default_factory=dict)  # the JAX code a kernel comes from (source) -> [FLOPs, HBM bytes]

    def add(self, other, times=1):
        self.flops += times * other.flops
        self.transcendentals += times * other.transcendentals
        self.bytes += times * other.bytes
        self.memory_bytes += times * other.memory_bytes
        self.kernels += times * other.kernels
        for kind, n in other.collectives.items():
            self.collectives[kind] = self.collectives.get(kind, 0) + times * n
        self.collective_bytes += times * other.collective_bytes
        self.in_loop += times * other.in_loop
        self.loops_uncounted += other.loops_uncounted
        for name, (flops, memory_bytes) in other.by_source.items():
            mine = self.by_source.setdefault(name, [0.0, 0.0])
            mine[0] += times * flops
            mine[1] += times * memory_bytes


def dot_flops(ins, shape_of):
    lhs_dims = arrays(shape_of(ins.operands[0]))[0][1]
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', ins.attrs)
    k = math.prod(lhs_dims[int(d)] for d in contracting[1].split(',') if d) if contracting else 1
    return 2 * shape_elements(ins.shape) * k


def window_pairs(out_size, in_size, window, stride, pad_low, lhs_dilate, rhs_dilate):
    """How many (output position, window position) pairs of one spatial dimension of a
    convolution land on an input element, not on padding or a hole of the input's dilation."""
    span = (in_size - 1) * lhs_dilate + 1
    pairs = 0
    for w in range(window):
        x = np.arange(out_size) * stride + w * rhs_dilate - pad_low
        pairs += int(np.count_nonzero((x >= 0) & (x < span) & (x % lhs_dilate == 0)))
    return pairs


def window_attribute(attrs, key, n, default):
    m = re.search(rf'\b{key}=([\d_x\-]+)', attrs)
    if not m:
        return [default] * n
    return [int(v.split('_')[0]) for v in m[1].split('x')]


def convolution_flops(ins, shape_of):
    """2 FLOPs per multiply-add of the input and kernel elements that meet: XLA writes batched
    matrix products as convolutions whose window, strides and dilation make most of the window
    land on holes."""
    lhs, kernel, out = (arrays(s)[0][1] for s in (shape_of(ins.operands[0]), shape_of(ins.operands[1]), ins.shape))
    lhs_labels, kernel_labels, out_labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', ins.attrs).groups()
    spatial = sorted(c for c in out_labels if c.isdigit())
    n = len(spatial)
    window = window_attribute(ins.attrs, 'size', n, 1)
    stride = window_attribute(ins.attrs, 'stride', n, 1)
    lhs_dilate = window_attribute(ins.attrs, 'lhs_dilate', n, 1)
    rhs_dilate = window_attribute(ins.attrs, 'rhs_dilate', n, 1)
    pad = re.search(r'\bpad=([\d_x\-]+)', ins.attrs)
    pad_low = [int(p.split('_')[0]) for p in pad[1].split('x')] if pad else [0] * n
    pairs = math.prod(window_pairs(out[out_labels.index(d)], lhs[lhs_labels.index(d)], window[i], stride[i],
                                   pad_low[i], lhs_dilate[i], rhs_dilate[i]) for i, d in enumerate(spatial))
    return 2 * out[out_labels.index('b')] * out[out_labels.index('f')] * pairs * kernel[kernel_labels.index('i')]


# the products of 2 B H bq bk D FLOPs that each kernel of Pallas' TPU flash attention computes per
# tile of bq queries x bk keys: the forward's scores and output; the backward's dq kernel the scores
# again, dP and dQ, its dkv kernel the scores, dP, dV and dK
FLASH_PRODUCTS = {'flash_attention': 2, 'flash_mha_bwd_dq': 3, 'flash_mha_bwd_dkv': 4}


def flash_flops(ins, shape_of, products):
    """FLOPs of a kernel of Pallas' TPU flash attention, which skips the tiles above the diagonal:
    jax's kernels declare no cost (the backward's) or that of all tiles (the forward's)."""
    B, H, T, D = arrays(shape_of(ins.operands[0]))[0][1]  # q
    bq = int((re.search(r'block_q_(?:major_)?(\d+)', ins.name) or [0, 128])[1])
    bk = int((re.search(r'block_k_major_(\d+)', ins.name) or [0, 128])[1])
    tiles = sum(min(-(-T // bk), -(-(i + 1) * bq // bk)) for i in range(-(-T // bq)))
    return 2 * products * B * H * bq * bk * D * tiles


def library_call_flops(ins, shape_of):
    """FLOPs of the library calls XLA makes on GPUs: cuBLAS matrix products and cuDNN's fused
    attention (half its tiles when causal, which it skips above the diagonal); of Pallas kernels on
    TPUs, the cost they declare, or for flash attention its tiles."""
    target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
    target = target[1] if target else ''
    flash = next((n for n in FLASH_PRODUCTS if ins.name.startswith(n)), None)
    if target == 'tpu_custom_call' and flash:
        return flash_flops(ins, shape_of, FLASH_PRODUCTS[flash])
    config = ins.backend_config()
    if 'gemm_backend_config' in config:
        numbers = config['gemm_backend_config'].get('dot_dimension_numbers', {})
        lhs = arrays(shape_of(ins.operands[0]))[0][1]
        k = math.prod(lhs[int(d)] for d in numbers.get('lhs_contracting_dimensions', []))
        return 2 * math.prod(arrays(ins.shape)[0][1]) * k
    if 'cudnn_fmha_backend_config' in config:
        fmha = config['cudnn_fmha_backend_config']
        scores = math.prod(int(d) for d in fmha['intermediate_tensor_shape']['dimensions'])  # B, H, T, S
        head_size = arrays(shape_of(ins.operands[0]))[0][1][-1]
        products = 5 if 'Backward' in target else 2  # backward: scores again, dP, dQ, dK, dV
        causal = 0.5 if fmha.get('mask_type') == 'CAUSAL' else 1.0
        return 2 * products * scores * head_size * causal
    estimate = config.get('custom_call_config', {}).get('cost_estimate') or config.get('cost_estimate')
    if estimate:
        return float(estimate.get('flops', 0))
    return 0.0


def op_flops(ins, shape_of):
    """(FLOPs, transcendentals) of one instruction other than a fusion."""
    if ins.opcode == 'dot':
        return dot_flops(ins, shape_of), 0
    if ins.opcode == 'convolution':
        return convolution_flops(ins, shape_of), 0
    if ins.opcode == 'custom-call':
        return library_call_flops(ins, shape_of), 0
    if ins.opcode in TRANSCENDENTAL:
        return 0, shape_elements(ins.shape)
    if ins.opcode in ARITHMETIC:
        return shape_elements(ins.shape), 0
    if ins.opcode in ('reduce', 'reduce-window'):
        return sum(shape_elements(shape_of(o)) for o in ins.operands[:len(ins.operands) // 2]), 0
    return 0, 0


def fused_flops(module, computation):
    """(FLOPs, transcendentals) of the instructions of a fused computation, fusions within included."""
    flops = transcendentals = 0.0
    instructions = module.instructions(computation)
    shape_of = lambda name: instructions[name].shape
    for ins in instructions.values():
        f, t = fused_flops(module, ins.called('calls')) if ins.opcode == 'fusion' else op_flops(ins, shape_of)
        flops, transcendentals = flops + f, transcendentals + t
    return flops, transcendentals


def read_bytes(module, fusion, i, operand_bytes):
    """Bytes a fusion reads of its operand i: the slices it takes when it only slices it."""
    computation = fusion.called('calls')
    instructions = module.instructions(computation)
    parameter = next((p for p in instructions.values() if p.opcode == 'parameter' and parameter_number(p) == i),
                     None)
    if parameter is None:
        return operand_bytes
    users = [u for u in instructions.values() if parameter.name in u.operands]
    if users and all(u.opcode in ('slice', 'dynamic-slice', 'gather') and u.operands[0] == parameter.name
                     for u in users):
        return min(operand_bytes, sum(shape_bytes(u.shape) for u in users))
    if users and all(u.opcode == 'dynamic-update-slice' and u.operands[0] == parameter.name for u in users):
        return 0  # updated in place: only the update is read and written
    return operand_bytes


def written_bytes(module, ins, memory):
    """Bytes a kernel writes: an update in place writes the update only."""
    if ins.opcode == 'fusion':
        root = module.root(ins.called('calls'))
        if root.opcode == 'dynamic-update-slice' and not (memory and re.search(r'S\([1-9]', ins.shape)):
            return shape_bytes(module.instructions(ins.called('calls'))[root.operands[1]].shape)
    if ins.opcode == 'dynamic-update-slice':
        return 0
    return shape_bytes(ins.shape, memory)


def kernel_bytes(module, ins, shape_of, memory=False, done=None):
    """Bytes a top-level instruction reads and writes; with memory, only those of arrays in the
    device's memory (not a TPU's on-chip memory). An asynchronous copy, slice or collective (an op
    ending in -start) writes what the op that waits for it (done) returns."""
    if done is not None:
        result = shape_bytes(done.shape, memory)
        read = sum(shape_bytes(shape_of(o), memory) for o in ins.operands)
        return (min(read, shape_bytes(done.shape)) if ins.opcode == 'slice-start' else read) + result
    sizes = [shape_bytes(shape_of(o), memory) for o in ins.operands]
    if ins.opcode == 'fusion':
        sizes = [read_bytes(module, ins, i, s) for i, s in enumerate(sizes)]
    elif ins.opcode in ('slice', 'dynamic-slice', 'gather'):
        sizes = [min(sizes[0], shape_bytes(ins.shape))] + sizes[1:]
    elif ins.opcode == 'dynamic-update-slice':
        sizes = [0, 2 * sizes[1]] + sizes[2:]
    return sum(sizes) + written_bytes(module, ins, memory)


def source(ins):
    """The JAX code an instruction comes from, by its op_name, the same for every layer and micro-step:
    'transpose(jvp(GPT))/h_*/mlp/c_fc/dot_general' (the backward of a layer's c_fc), or its opcode."""
    name = re.search(r'op_name="([^"]*)"', ins.attrs)
    if not name:
        return ins.opcode
    name = re.sub(r'^jit\([^)]*\)/|(?:while/body/|closed_call/|checkpoint/|rematted_computation/|shard_map/)', '',
                  name[1])
    return re.sub(r'\bh_\d+\b', 'h_*', name)


def collective_kind(opcode):
    return COLLECTIVES.get(opcode[:-len('-start')] if opcode.endswith('-start') else opcode)


def read_value(parameters, read):
    """What a read (parameter, tuple index or None) of Evaluator.reads found, in a form that compares."""
    value = parameters.get(read[0])
    if read[1] is not None:
        value = value[read[1]] if isinstance(value, tuple) and read[1] < len(value) else None
    return comparable(value)


class Analysis:
    def __init__(self, text):
        self.module = Module(text)
        self.static = {}  # computation -> the costs of its instructions that do not depend on loop state
        self.loops = {}  # computation -> whether it runs a while loop
        self.runs = {}  # computation -> [(what it read of its parameters, the values read, its costs)]

    def static_costs(self, computation):
        """The costs of a computation's instructions other than loops and calls that hold them."""
        if computation in self.static:
            return self.static[computation]
        costs = Costs()
        instructions = self.module.instructions(computation)
        shape_of = lambda name: instructions[name].shape
        done = {i.operands[0]: i for i in instructions.values() if i.opcode.endswith('-done') and i.operands}
        for ins in instructions.values():
            if ins.opcode in FREE or ins.opcode.endswith('-done') or self.holds_loop(ins) or \
                    (ins.opcode == 'custom-call' and ins.attribute('custom_call_target').strip('"') in FREE_CALLS):
                continue
            if ins.opcode == 'async-start':
                costs.add(self.static_costs(ins.called('calls')))
                continue
            costs.kernels += 1
            costs.bytes += kernel_bytes(self.module, ins, shape_of, done=done.get(ins.name))
            memory_bytes = kernel_bytes(self.module, ins, shape_of, True, done.get(ins.name))
            costs.memory_bytes += memory_bytes
            f = t = 0
            kind = collective_kind(ins.opcode)
            if kind:
                costs.collectives[kind] = costs.collectives.get(kind, 0) + 1
                costs.collective_bytes += sum(shape_bytes(shape_of(o)) for o in ins.operands)
            elif ins.opcode == 'fusion':
                f, t = fused_flops(self.module, ins.called('calls'))
            else:
                f, t = op_flops(ins, shape_of)
            costs.flops, costs.transcendentals = costs.flops + f, costs.transcendentals + t
            mine = costs.by_source.setdefault(source(ins), [0.0, 0.0])
            mine[0] += f
            mine[1] += memory_bytes
        self.static[computation] = costs
        return costs

    def called(self, ins):
        """The computations an instruction runs (not the fused ones, whose costs are its own)."""
        return [c for c in re.findall(r'%([\w.\-]+)', ins.attrs.split('metadata=')[0]) if c in self.module.computations]

    def holds_loop(self, ins):
        """Whether an instruction is, or runs a computation that runs, a while loop."""
        if ins.opcode == 'while':
            return True
        if ins.opcode not in ('call', 'conditional', 'async-start'):
            return False
        for c in self.called(ins):
            if c not in self.loops:
                self.loops[c] = any(self.holds_loop(i) for i in self.module.instructions(c).values())
        return any(self.loops[c] for c in self.called(ins))

    def costs(self, computation, parameters, in_loop=False):
        """The costs of one run of computation, its parameters holding the given values. Runs
        that read the same values of the parameters cost the same: the micro-step loop's body
        is followed once, not once per micro-step."""
        for reads, values, costs in self.runs.get(computation, []):
            if [read_value(parameters, r) for r in reads] == values:
                return costs
        costs = Costs()
        costs.add(self.static_costs(computation))
        if in_loop:
            costs.in_loop += sum(self.static_costs(computation).collectives.values())
        evaluator = Evaluator(self.module, computation, parameters)
        for ins in self.module.instructions(computation).values():
            if not self.holds_loop(ins):
                continue
            if ins.opcode == 'while':
                body, condition = ins.called('body'), ins.called('condition')
                states = trip_values(self.module, ins, evaluator(ins.operands[0]))
                if states is None:  # counted once
                    costs.loops_uncounted += 1
                    costs.add(self.costs(body, {0: None}, True))
                    continue
                for state in states[:-1]:
                    costs.add(self.costs(body, {0: state}, True))
                    costs.add(self.costs(condition, {0: state}, True))
                costs.add(self.costs(condition, {0: states[-1]}, True))
            elif ins.opcode == 'conditional':  # the most costly branch
                branches = [self.costs(c, {0: evaluator(o)}, in_loop) for c, o in zip(self.called(ins), ins.operands[1:])]
                costs.add(max(branches, key=lambda c: (c.flops, c.bytes)))
            else:
                costs.add(self.costs(self.called(ins)[0], {i: evaluator(o) for i, o in enumerate(ins.operands)}, in_loop))
        reads = sorted(evaluator.reads, key=str)
        self.runs.setdefault(computation, []).append((reads, [read_value(parameters, r) for r in reads], costs))
        return costs


def program_costs(hlo_text):
    """The Costs of one run of the program whose optimized HLO module is hlo_text."""
    analysis = Analysis(hlo_text)
    return analysis.costs(analysis.module.entry, {})


def attention_in(hlo_text):
    """The attention implementations a compiled model runs, by the names jax_attention.attention
    gives their ops: e.g. ['cudnn'], or ['blockwise', 'dense'] when two calls chose differently."""
    return sorted(set(re.findall(r'/(dense|blockwise|cudnn|flash)_attention/', hlo_text)))
