"""
The GPUs and TPUs people train on, and how to compile for them without the hardware:

    devices, target = target_devices('v5e-8')  # 8 TPU v5e chips of one host, as jax devices
    devices, target = target_devices('2x8xh100')  # 2 hosts of 8 H100s
    peak_flops('TPU v5 lite')  # for MFU: dense bfloat16 FLOP/s of one device, by jax's device_kind

Targets are named as users know them: a GPU ('a100-40gb', 'a100-80gb', 'h100', 'h200'), N of them
on one host ('8xh100') or on each of H hosts ('2x8xh100'); a Cloud TPU slice by its accelerator
type ('v4-8', 'v5e-1' ... 'v5e-256' (also 'v5litepod-N'), 'v5p-8', 'v6e-8'), counting TensorCores
for v4 and v5p (2 a chip, one jax device) and chips for v5e and v6e. jax makes their devices from
jax.experimental.topologies: libtpu for TPUs, jax[cuda13]'s plugin for GPUs (see
requirements_compile.txt), on any machine.
"""

import importlib.util
import os
import re
from typing import NamedTuple


class Accelerator(NamedTuple):
    name: str  # as a target names it
    device_kind: str  # as jax's device.device_kind names it
    memory: int  # bytes of device memory: a GPU's as CUDA reports it; of a TPU chip's HBM, what XLA leaves programs
    peak_flops: float  # dense bfloat16 FLOP/s
    bandwidth: float  # device memory bytes/s
    source: str
    gpu: tuple = ()  # GPUs: SMs, compute capability, L2 bytes, clock GHz, shared memory per SM and per block,
                     # FP32 units per SM, for the target config XLA compiles with


ACCELERATORS = [
    Accelerator('a100-40gb', 'NVIDIA A100-SXM4-40GB', 42_505_273_344, 312e12, 1555e9, 'NVIDIA A100 datasheet',
                (108, (8, 0), 40 * 2**20, 1.41, 167_936, 166_912, 64)),
    Accelerator('a100-80gb', 'NVIDIA A100-SXM4-80GB', 85_198_045_184, 312e12, 2039e9, 'NVIDIA A100 datasheet',
                (108, (8, 0), 40 * 2**20, 1.41, 167_936, 166_912, 64)),
    Accelerator('h100', 'NVIDIA H100 80GB HBM3', 84_929_347_584, 989e12, 3352e9, 'NVIDIA H100 datasheet (SXM)',
                (132, (9, 0), 50 * 2**20, 1.98, 233_472, 232_448, 128)),
    Accelerator('h200', 'NVIDIA H200', 150_754_820_096, 989e12, 4800e9, 'NVIDIA H200 datasheet (SXM)',
                (132, (9, 0), 50 * 2**20, 1.98, 233_472, 232_448, 128)),
    # TPU memory: XLA's TPU compiler's "available HBM" (in its out-of-memory errors), of 32, 16, 95 and 32 GiB
    Accelerator('v4', 'TPU v4', int(30.75 * 2**30), 275e12, 1200e9, 'cloud.google.com/tpu/docs/v4'),
    Accelerator('v5e', 'TPU v5 lite', int(15.75 * 2**30), 197e12, 819e9, 'cloud.google.com/tpu/docs/v5e'),
    Accelerator('v5p', 'TPU v5', int(95.73 * 2**30), 459e12, 2765e9, 'cloud.google.com/tpu/docs/v5p'),
    Accelerator('v6e', 'TPU v6 lite', int(31.24 * 2**30), 918e12, 1640e9, 'cloud.google.com/tpu/docs/v6e'),
]
BY_NAME = {a.name: a for a in ACCELERATORS}

# Dense bfloat16 FLOP/s (float16 for the V100 and T4, which have no bfloat16) of devices that are not
# targets, by jax's device_kind exactly (an L40 is not an L4), from their makers' datasheets
PEAK_FLOPS = {
    'NVIDIA A100-PCIE-40GB': 312e12, 'NVIDIA A100 80GB PCIe': 312e12, 'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H100 NVL': 835e12, 'NVIDIA GH200 480GB': 989e12, 'NVIDIA H20': 148e12, 'NVIDIA B200': 2250e12,
    'NVIDIA L4': 121e12, 'NVIDIA L40': 181e12, 'NVIDIA L40S': 362e12, 'NVIDIA A10': 125e12, 'NVIDIA A10G': 70e12,
    'NVIDIA GeForce RTX 4090': 165e12, 'NVIDIA GeForce RTX 3090': 71e12, 'Tesla V100-SXM2-16GB': 125e12,
    'Tesla V100-SXM2-32GB': 125e12, 'Tesla V100-PCIE-16GB': 112e12, 'Tesla T4': 65e12,
    'AMD Instinct MI300X': 1307e12, 'AMD Instinct MI250X': 383e12, 'TPU v2': 45e12, 'TPU v3': 123e12,
}

# Cloud TPU slices: chips -> (topology, chips per host); hosts of 4 chips beyond one host
TWO_D_SLICES = {1: ('1x1', (1, 1, 1)), 4: ('2x2', (2, 2, 1)), 8: ('2x4', (2, 4, 1)), 16: ('4x4', (2, 2, 1)),
                32: ('4x8', (2, 2, 1)), 64: ('8x8', (2, 2, 1)), 128: ('8x16', (2, 2, 1)), 256: ('16x16', (2, 2, 1))}
THREE_D_SLICES = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 256: '4x8x8',
                  512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16'}
TPU_FAMILIES = {'v4': ('v4', 2), 'v5p': ('v5p', 2), 'v5e': ('v5e', 1), 'v5litepod': ('v5e', 1), 'v6e': ('v6e', 1)}

# what the CUDA libraries the GPU target configs were written for report (jax[cuda13])
CUDNN_VERSION, CUDA_RUNTIME = (9, 7), (13, 0)


def peak_flops(device_kind):
    """Dense bfloat16 FLOP/s of one device of jax's device_kind, None when unknown."""
    target = next((a.peak_flops for a in ACCELERATORS if a.device_kind == device_kind), None)
    return target or PEAK_FLOPS.get(device_kind)


def compute_capability(device):
    """An NVIDIA GPU's compute capability (9.0 for an H100), 0.0 for any other device."""
    try:
        return float(getattr(device, 'compute_capability', '')) if device.platform == 'gpu' else 0.0
    except ValueError:  # an AMD GPU's ('gfx942')
        return 0.0


def fast_bfloat16(device):
    """Whether a device computes in bfloat16 faster than in float32: TPUs, AMD's GPUs and NVIDIA's
    from the A100 (compute capability 8.0) on; not a CPU, a V100 or a T4 (float16 alone)."""
    if device.platform == 'gpu':
        return compute_capability(device) >= 8.0 or 'NVIDIA' not in device.device_kind and \
            not device.device_kind.startswith('Tesla')
    return device.platform == 'tpu'


def usable_memory(accelerator):
    """Bytes of a device's memory that jax's programs may use: a TPU's HBM; on GPUs the share
    XLA_PYTHON_CLIENT_MEM_FRACTION says (75% unless set), which jax's allocator takes at start."""
    if not accelerator.gpu:
        return accelerator.memory
    return int(accelerator.memory * float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 0.75)))


def known_targets():
    gpus = ', '.join(a.name for a in ACCELERATORS if a.gpu)
    return (f"a GPU ({gpus}), N of them ('8xh100') or N on each of H hosts ('2x8xh100'); a TPU slice: "
            f"v4-8 ... v4-4096, v5p-8 ... v5p-4096 (TensorCores), v5e-1, v5e-4, v5e-8 ... v5e-256, "
            f"v6e-1 ... v6e-256 (chips); or cpu, this machine")


def parse_target(target):
    """(Accelerator, the arguments of jax's get_topology_desc for it) of a target name.
    ValueError, listing the known targets, for any other name."""
    gpu = re.fullmatch(r'(?:(\d+)x)?(?:(\d+)x)?([a-z0-9\-]+)', target)
    if gpu and gpu[3] in BY_NAME and BY_NAME[gpu[3]].gpu:
        hosts, per_host = (int(gpu[1]), int(gpu[2])) if gpu[2] else (1, int(gpu[1] or 1))
        if hosts >= 1 and per_host >= 1:
            return BY_NAME[gpu[3]], dict(platform='cuda', topology=f'1x{hosts}x{per_host}',
                                         target_config=gpu_target_config(BY_NAME[gpu[3]]))
    tpu = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', target)
    if tpu:
        family, per_chip = TPU_FAMILIES[tpu[1]]
        chips, remainder = divmod(int(tpu[2]), per_chip)
        slices = THREE_D_SLICES if per_chip == 2 else TWO_D_SLICES
        if remainder == 0 and chips in slices:
            if per_chip == 2:  # one jax device a chip: its two TensorCores work as one (megacore)
                wrap = (chips >= 64,) * 3
                args = dict(topology_name=f'{family}:{slices[chips]}', chip_config_name='megacore',
                            chips_per_host_bounds=(2, 2, 1) if chips > 4 else None, wrap=wrap)
            else:
                topology, per_host = slices[chips]
                wrap = (chips >= 256, chips >= 128, False)
                args = dict(topology_name=f'{family}:{topology}', chips_per_host_bounds=per_host, wrap=wrap)
            return BY_NAME[family], dict(platform='tpu', **{k: v for k, v in args.items() if v is not None})
    raise ValueError(f"unknown target {target!r}: name {known_targets()}")


def gpu_target_config(a):
    """The text of XLA's GpuTargetConfig for a GPU: what XLA compiles for when the GPU is not there."""
    sms, (major, minor), l2, clock, smem_per_sm, smem_per_block, fpus = a.gpu
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_sm}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(a.bandwidth)}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {a.memory}
  shared_memory_per_block_optin: {smem_per_block}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {CUDNN_VERSION[0]}
  minor: {CUDNN_VERSION[1]}
}}
runtime_version {{
  major: {CUDA_RUNTIME[0]}
  minor: {CUDA_RUNTIME[1]}
}}
device_description_str: "{a.device_kind}"
"""


def attached():
    """The accelerator this machine has, 'tpu' or 'gpu', or None: what jax itself looks for (TPU
    chips on the PCI bus, NVIDIA or AMD device files), not the packages installed, since
    requirements_compile.txt installs libtpu and jax[cuda13] on machines without either."""
    from jax._src import hardware_utils
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return 'tpu'
    if hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus(stop_at=1) > 0:
        return 'gpu'
    return None


def quietly(f, *args, **kwargs):
    """f(*args, **kwargs) with the C++ libraries' stderr silenced: libtpu, loaded on a machine
    that is not a TPU VM, prints pages of warnings about the TPU it does not find, and XLA's GPU
    compiler warns of what it cannot tune without the GPU. Python's errors still say what failed."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        return f(*args, **kwargs)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def local_target_config():
    """The target config of this machine's GPU as XLA sees it: the exact figures, to compile for it
    elsewhere (compile_jax.py --target_config). ValueError without a GPU."""
    if attached() != 'gpu':
        raise ValueError("saving a GPU's target config needs that GPU: run it on the machine that has it")
    import jax
    from jax._src.lib import xla_client
    return xla_client.get_topology_for_devices(jax.devices()).target_config


def target_devices(target, target_config=None):
    """(jax devices of the target, its Accelerator) for compiling without the hardware; each
    device's process_index is its host. A GPU target compiles with target_config (text) when
    given, else with the table's figures. ValueError for an unknown target name, or when the
    package that compiles for it is missing or fails."""
    from jax.experimental import topologies
    accelerator, args = parse_target(target)
    if target_config is not None:
        if args['platform'] != 'cuda':
            raise ValueError(f"a target config is a GPU's: {target} is a TPU slice")
        args['target_config'] = target_config
    package, module = ('libtpu', 'libtpu') if args['platform'] == 'tpu' else ('jax[cuda13]', 'jax_plugins.xla_cuda13')
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"compiling for {target} needs {package} at jax's version: "
                         f"pip install -r requirements_compile.txt")
    # no TPU is touched: several processes may compile at once (libtpu otherwise locks its use to one)
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
        return quietly(topologies.get_topology_desc, **args).devices, accelerator
    except Exception as e:  # jax's errors: RuntimeError, NotImplementedError, its own JaxRuntimeError
        raise ValueError(f"{package} cannot compile for {target} here: {str(e).strip().splitlines()[0]}") from None
