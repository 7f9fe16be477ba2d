"""The fused kernels as a GPU will run them, compiled and inspected ahead of time, with no GPU present.

Triton compiles for a target that is not there (`_triton_compat.compile_for_target`), and the `ptxas` and
`cuobjdump` bundled in its wheel read the result. `compile_kernels` compiles the launches that
`forward_plan` / `backward_plan` make (the same code the launcher runs), with the argument
specialisation of Triton's own JIT binder (16-byte pointer alignment, integers divisible by 16 or
equal to 1), so the registers, spills and instructions it shows are those of the kernels a GPU runs.
`kernel_facts` turns one compiled kernel into the numbers that decide its fit: registers, local memory,
shared memory, resident warps per SM and the SASS instruction mix.

Triton's interpreter replaces its standard library (`tl.sum`, `tl.max`, ...) with interpreted versions
when TRITON_INTERPRET=1 is set at import, which breaks code generation: compile in a process without it.
"""
import math
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
from triton.runtime import Autotuner

from ._triton_compat import TargetKernel, compile_for_target, cuobjdump_path, pruned_configs
from .super_token_triton import INTERPRET, Launch, backward_plan, forward_plan

__all__ = ['ARCHS', 'KernelFacts', 'LaunchGeometry', 'TargetKernel', 'compile_kernels', 'issued_warp_instructions',
           'kernel_facts', 'launch_geometry']


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of a compute capability (CUDA C Programming Guide, "Compute capabilities")."""
    name: str
    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 0  # shared memory an SM can give to resident blocks
    reserved_shared_per_block: int = 1024  # what the system keeps per block (CUDA 11+)
    hbm_bytes_per_s: float = 0.0  # the flagship part's datasheet figures, for the report's time floors
    fp32_flops_per_s: float = 0.0
    sms: int = 0
    boost_clock_hz: float = 0.0
    issue_per_clock: int = 4  # warp instructions an SM issues per clock: one per scheduler

    @property
    def warp_instructions_per_s(self) -> float:
        """The issue rate of the whole GPU: the floor of a launch that is bound by instructions, not bytes."""
        return self.sms * self.issue_per_clock * self.boost_clock_hz


ARCHS: Dict[int, SMLimits] = {
    80: SMLimits('sm_80 (A100 SXM4 80GB)', shared_bytes=164 * 1024, hbm_bytes_per_s=2.039e12,
                 fp32_flops_per_s=19.5e12, sms=108, boost_clock_hz=1.41e9),
    90: SMLimits('sm_90 (H100 SXM5 80GB)', shared_bytes=228 * 1024, hbm_bytes_per_s=3.35e12,
                 fp32_flops_per_s=66.9e12, sms=132, boost_clock_hz=1.98e9),
}

_SASS: Dict[str, List[Tuple[int, str]]] = {}  # TargetKernel.hash -> its disassembly, read once


def _config_label(config: triton.Config) -> str:
    return ','.join(f'{k}={v}' for k, v in config.all_kwargs().items())


def _launch_variants(launch: Launch, chosen: Optional[Dict[str, triton.Config]] = None):
    """(key, JIT function, kwargs) of each kernel a launch may run: each config its autotuner keeps for its args,
    or only the one `chosen` names for the kernel."""
    if isinstance(launch.kernel, Autotuner):
        name = launch.label or launch.kernel.fn.__name__
        configs = ([chosen[launch.kernel.fn.__name__]] if chosen is not None else
                   pruned_configs(launch.kernel, launch.args, launch.constexprs))
        for config in configs:
            yield f'{name}[{_config_label(config)}]', launch.kernel.fn, {**launch.constexprs, **config.all_kwargs()}
    else:
        yield launch.label or launch.kernel.__name__, launch.kernel, launch.constexprs


def _super_token_launches(shape: Tuple[int, int, int, int], dtype: torch.dtype, grid: int, iters: int,
                          memory_format: torch.memory_format) -> List[Launch]:
    """Every launch of the fused forward and backward for a meta input of this shape, dtype and layout."""
    x = torch.empty(shape, dtype=dtype, device='meta', memory_format=memory_format)
    launches, (out, aff, inv_norm) = forward_plan(x, grid, iters)
    return launches + backward_plan(torch.empty_like(out), aff, inv_norm, grid)[0]


def compile_kernels(
        shape: Tuple[int, int, int, int],
        dtype: torch.dtype,
        *,
        grid: int = 2,
        iters: int = 3,
        arch: int = 90,
        memory_format: torch.memory_format = torch.contiguous_format,
) -> Dict[str, TargetKernel]:
    """Compile every kernel the fused forward and backward launch for a (B, C, H, W) input, for sm_`arch`.

    Needs no GPU. Keys are the kernels' names; an autotuned kernel gives one entry per config, keyed
    `name[config]`, and a kernel launched with other argument types (the last aggregation writes the
    output) is keyed by its launch label.
    """
    _check_can_compile(arch)
    return _compile_launches(_super_token_launches(shape, dtype, grid, iters, memory_format), arch)


@dataclass(frozen=True)
class LaunchGeometry:
    """How often a compiled kernel runs: launches per forward+backward, programs per launch, its loops' trip counts."""
    launches: int
    programs: int
    loop_trips: Tuple[int, ...]


def launch_geometry(
        shape: Tuple[int, int, int, int],
        dtype: torch.dtype,
        *,
        grid: int = 2,
        iters: int = 3,
        memory_format: torch.memory_format = torch.contiguous_format,
) -> Dict[str, LaunchGeometry]:
    """The geometry of every kernel `compile_kernels` compiles for the same arguments, by the same keys."""
    variants = [(key, launch, kwargs) for launch in _super_token_launches(shape, dtype, grid, iters, memory_format)
                for key, _, kwargs in _launch_variants(launch)]
    launches = Counter(key for key, _, _ in variants)
    return {key: LaunchGeometry(launches[key], math.prod(launch.grid(kwargs)), launch.loops)
            for key, launch, kwargs in variants}


def issued_warp_instructions(
        shape: Tuple[int, int, int, int],
        dtype: torch.dtype,
        configs: Dict[str, triton.Config],
        *,
        grid: int = 2,
        iters: int = 3,
        arch: int = 90,
) -> Dict[str, int]:
    """Warp instructions each fused kernel issues in one forward+backward of a channels_last input, by kernel name.

    `configs` names the autotune config each autotuned kernel runs (its `best_config` after a timed call on
    the GPU), so a measured GPU time per kernel divided by this count gives the issue rate it achieved.
    """
    _check_can_compile(arch)
    issued: Dict[str, int] = Counter()
    for launch in _super_token_launches(shape, dtype, grid, iters, torch.channels_last):
        (_, jit, kwargs), = _launch_variants(launch, configs)
        facts = kernel_facts(compile_for_target(jit, launch.args, kwargs, arch), arch, launch.loops)
        issued[jit.__name__] += facts.issued * facts.warps * math.prod(launch.grid(kwargs))
    return dict(issued)


def _check_can_compile(arch: int) -> None:
    if INTERPRET:
        raise RuntimeError('compiling the kernels needs Triton\'s compiler, but this process imported Triton with '
                           'TRITON_INTERPRET=1 (its interpreted standard library breaks code generation); '
                           'run it in a process without that variable')
    if arch not in ARCHS:
        raise ValueError(f'the kernel report knows the SM limits of archs {sorted(ARCHS)}, got {arch}')


def _compile_launches(launches, arch: int) -> Dict[str, TargetKernel]:
    """One compiled kernel per name (and per autotune config) among the launches."""
    kernels = {}
    for launch in launches:
        for key, jit, kwargs in _launch_variants(launch):
            if key not in kernels:
                kernels[key] = compile_for_target(jit, launch.args, kwargs, arch)
    return kernels


@dataclass(frozen=True)
class KernelFacts:
    """What decides a compiled kernel's fit to an SM, read from ptxas and the SASS."""
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    local_instructions: int  # LDL/STL in the SASS: any use of local memory
    shared_bytes: int
    warps: int
    resident_warps: int
    occupancy_limiter: str
    mma: int  # tensor-core instructions (HMMA/HGMMA/IMMA/...)
    ffma: int
    global_loads: Dict[int, int]  # access width in bits -> count of LDG
    global_stores: Dict[int, int]
    loop_depth: int  # nested loops left in the SASS
    issued: int  # instructions one warp issues per program, loops run at the launch's trip counts

    @property
    def local_memory(self) -> bool:
        return bool(self.stack_bytes or self.spill_store_bytes or self.spill_load_bytes or self.local_instructions)


def _ptxas_numbers(log: str) -> Tuple[int, int, int, int]:
    """(registers, stack, spill stores, spill loads) from a `ptxas -v` log."""
    regs = re.search(r'Used (\d+) registers', log)
    frame = re.search(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads', log)
    if regs is None or frame is None:
        raise RuntimeError(f'could not read registers and spills from the ptxas log:\n{log}')
    return int(regs.group(1)), int(frame.group(1)), int(frame.group(2)), int(frame.group(3))


def _sass(cubin: bytes) -> List[Tuple[int, str]]:
    """(address, instruction without its predicate) of a cubin's SASS, disassembled by Triton's cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'kernel.cubin'
        path.write_bytes(cubin)
        sass = subprocess.run([cuobjdump_path(), '-sass', str(path)], check=True,
                              capture_output=True, text=True).stdout
    return [(int(address, 16), instruction.strip()) for address, instruction in
            re.findall(r'^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][^;]*);', sass, re.M)]


def _opcode(instruction: str) -> str:
    return instruction.split()[0]


def _loops(sass: List[Tuple[int, str]]) -> List[Tuple[int, int]]:
    """(first, last) address of each loop: a branch back to an earlier address (a branch to itself ends the kernel)."""
    loops = []
    for address, instruction in sass:
        target = re.match(r'BRA\S* (?:`\()?(0x[0-9a-f]+)', instruction)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    return loops


def _issued(sass: List[Tuple[int, str]], loop_trips: Sequence[int]) -> Tuple[int, int]:
    """(instructions one warp issues per program, loop depth of the SASS) with each loop run `loop_trips` times.

    `loop_trips` are the kernel's loops as written, outer to inner; empty, every loop runs once. The compiler
    may unroll an inner loop whose trip count is a constant (its body then appears that many times in the
    SASS) but not an outer one of runtime length, so the SASS keeps the outer `depth` of them.
    """
    loops = _loops(sass)
    loop_trips = tuple(loop_trips) or (1,) * len(loops)
    depths = [sum(first <= address <= last for first, last in loops) for address, _ in sass]
    depth = max(depths, default=0)
    if depth > len(loop_trips):
        raise ValueError(f'the SASS has {depth} nested loops, the launch declares {len(loop_trips)}: {loop_trips}')
    # alignment padding and the branch-to-self after the last EXIT never issue
    return sum(math.prod(loop_trips[:d]) for (address, instruction), d in zip(sass, depths)
               if _opcode(instruction) != 'NOP' and instruction != f'BRA {address:#x}'), depth


def _access_bits(opcode: str) -> int:
    """Width of an LDG/STG from its modifiers: .U8/.S8, .U16/.S16, .64, .128, else 32 bits."""
    mods = opcode.split('.')[1:]
    for bits in ('128', '64'):
        if bits in mods:
            return int(bits)
    if any(m in ('U16', 'S16') for m in mods):
        return 16
    if any(m in ('U8', 'S8') for m in mods):
        return 8
    return 32


def _resident_warps(registers: int, shared: int, warps: int, limits: SMLimits) -> Tuple[int, str]:
    """Warps an SM keeps resident, and the resource that caps them (registers are allocated per warp in 256s)."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    caps = {
        'registers': limits.registers // (regs_per_warp * warps),
        'threads': limits.max_warps // warps,
        'blocks': limits.max_blocks,
        'shared memory': limits.shared_bytes // (shared + limits.reserved_shared_per_block),
    }
    limiter = min(caps, key=caps.get)
    return caps[limiter] * warps, limiter


def kernel_facts(kernel: TargetKernel, arch: int, loop_trips: Sequence[int] = ()) -> KernelFacts:
    """Registers, local memory, shared memory, occupancy and instruction mix of a kernel from `compile_kernels`.

    `loop_trips` are the trip counts of the kernel's loops, outer to inner (`launch_geometry`); without them a
    loop body counts once in `issued`.
    """
    registers, stack, spill_stores, spill_loads = _ptxas_numbers(kernel.ptxas_log)
    if kernel.hash not in _SASS:
        _SASS[kernel.hash] = _sass(kernel.cubin)
    sass = _SASS[kernel.hash]
    ops = Counter(_opcode(instruction) for _, instruction in sass)
    issued, depth = _issued(sass, loop_trips)
    warps, shared = kernel.num_warps, kernel.shared_bytes
    resident, limiter = _resident_warps(registers, shared, warps, ARCHS[arch])
    loads, stores = Counter(), Counter()
    for op, count in ops.items():
        if op.startswith('LDG'):
            loads[_access_bits(op)] += count
        elif op.startswith('STG'):
            stores[_access_bits(op)] += count
    return KernelFacts(
        registers=registers, stack_bytes=stack, spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
        local_instructions=sum(c for op, c in ops.items() if op.startswith(('LDL', 'STL'))),
        shared_bytes=shared, warps=warps, resident_warps=resident, occupancy_limiter=limiter,
        mma=sum(c for op, c in ops.items() if re.match(r'[HIDBQ]G?MMA', op)),
        ffma=sum(c for op, c in ops.items() if op.split('.')[0] == 'FFMA'),
        global_loads=dict(sorted(loads.items())), global_stores=dict(sorted(stores.items())),
        loop_depth=depth, issued=issued,
    )
