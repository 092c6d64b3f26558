"""Ahead-of-time compile check of the project's Triton kernels for sm_80 (A100) and sm_90 (H100/H200), no GPU needed.

    python -m tools.aot [--subset=ci|full] [--arch=80,90] [--head-dims=64,128] [--dtypes=bf16,fp16]
                          [--kernels=_fwd_kernel,...] [--jobs=N] [--out=build/aot/] [--cache-dir=DIR]
    python -m tools.aot --check-launchers     # only: does SPECS match what the launchers pass Triton? (seconds)
    python -m tools.aot --compare A.jsonl B.jsonl   # only: variants usable in one result file and not the other
                                                      # (exit status 1 when there is one)

Each variant goes through the full Triton pipeline (`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`) down to a cubin made by the `ptxas` bundled in Triton's wheel, in a throwaway `TRITON_CACHE_DIR` (so every
number is a real compile). Per variant it records registers per thread and spills (from ptxas' `-v` log, which
Triton prints when `knobs.nvidia.dump_ptxas_log` is on), shared memory (`metadata.shared`) against the arch's
opt-in per-block limit, and the compile time. Writes `aot_triton-<version>.jsonl` and `.md` under `--out`.

Fails (exit status 1, one line per failure) on: a compile error; shared memory above the arch limit in a config of
the pruned list (a candidate that overflows is only reported: the tuned list leaves it out); a group
(kernel, arch, dtype, head dim, has_bias, table dtype) with no spill-free config; and any config of
the kernel's pruned list that spills. The pruned list is what a kernel module's optional hook returns:

    def aot_configs(kernel: str, arch: int, head_dim: int) -> list[triton.Config] | None

(`kernel` is the kernel's name, e.g. "_bwd_dkdv_kernel"; None = no pruning for that kernel). Without the hook the
pruned list is the full candidate list, so every candidate config must be spill-free. `--subset=ci` compiles only
the pruned lists (without a hook: every candidate) for D=64, bf16; `--subset=full` compiles every candidate.

Specialisation model: Triton's launcher marks a pointer argument `tt.divisibility=16` when its address is 16-byte
aligned and an integer when it is a multiple of 16 (1 would become a constant). The spec below uses the realistic
case of the BEiT shapes: every pointer aligned (fresh torch allocations, and q/k/v slices of a qkv projection sit at
offsets of H·D elements), the strides of `[B, H, N, D]` tensors with D = 64 or 128 all multiples of 16 (`i32/16`),
and N = 197, H, B and group counts plain `i32` (BEiT-L's H = 16 would be specialised too; it only feeds index math).
`--check-launchers` verifies this model: it runs the real launchers on CPU tensors of BEiT-B's shapes under a
stand-in driver, records the signature Triton specialises for each kernel, and compares it with SPECS.
Spill counts are ptxas' "bytes spill stores/loads"; `n_spills` is what `CompiledKernel.n_spills` reports on a GPU
(the function's local memory in 4-byte words).
"""

