"""Compile every Triton kernel of the worker for a Hopper GPU (sm_90), with no GPU present.

The tests without a GPU run the kernels in Triton's interpreter, which never compiles them:
a kernel that the interpreter runs can still fail to compile for the device. This script
takes each kernel, in the variants the worker launches, through Triton's whole pipeline
(to PTX and, with the ptxas that Triton ships, to a cubin), as the JIT would on an H100 or
H200: pointers and strides specialised as 16-byte aligned. Run with TRITON_INTERPRET=0:
``python -m tests.gpu_worker.hopper_compile``; it prints one line per variant and exits
non-zero if any fails to compile.
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys

HOPPER = ("cuda", 90, 32)


def compile_for_hopper(kernel, types: dict[str, str], constexprs: dict, **options):
    """``kernel`` (a JITFunction) compiled for sm_90; ``types`` gives every runtime
    parameter's Triton type ("*bf16", "i32", "fp32", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n not in constexprs and (types[n].startswith("*") or "stride" in n)}
    source = ASTSource(kernel, signature, constexprs=dict(constexprs), attrs=aligned)
    return triton.compile(source, target=GPUTarget(*HOPPER), options=options)


def ptrs(dtype: str, *names: str) -> dict[str, str]:
    return {n: f"*{dtype}" for n in names}


def ints(*names: str) -> dict[str, str]:
    return {n: "i32" for n in names}


def variants():
    """(label, kernel, types, constexprs, options) for each launch the worker makes."""
    from gpu_worker.kernels import decode, fused, linear
    from gpu_worker.kernels import paged_attention as pa

    norm = ptrs("bf16", "x_ptr", "res_ptr", "w_ptr", "y_ptr") | ints(
        "x_stride", "res_stride", "y_stride", "n_cols") | {"eps": "fp32"}
    for weighted in (True, False):  # without: the weight is in the next product's
        yield (f"rms_norm weight={weighted}", fused._rms_norm_kernel, norm,
               dict(BLOCK=4096, HAS_WEIGHT=weighted, LIBDEVICE=True),
               dict(num_warps=8, enable_fp_fusion=False))
        yield (f"add_rms_norm weight={weighted}", fused._add_rms_norm_kernel, norm,
               dict(BLOCK=4096, HAS_WEIGHT=weighted, LIBDEVICE=True),
               dict(num_warps=8, enable_fp_fusion=False))
    rope = ptrs("bf16", "q_ptr", "k_ptr", "v_ptr", "key_cache", "value_cache", "cos_ptr",
                "sin_ptr") | ptrs("i64", "slot_ptr", "pos_ptr") | ints(
        "q_token_stride", "q_head_stride", "k_token_stride", "v_token_stride",
        "kv_head_stride", "table_stride", "num_heads", "num_kv_heads")
    yield ("rope_write_kv", fused._rope_write_kv_kernel, rope,
           dict(HALF=64, BLOCK_D=64, BLOCK_HQ=32, BLOCK_HK=8),
           dict(num_warps=4, enable_fp_fusion=False))
    silu = ptrs("bf16", "gate_up_ptr", "out_ptr") | ints("in_stride", "out_stride", "n_cols")
    yield ("silu_and_mul", fused._silu_and_mul_kernel, silu, dict(BLOCK=1024, LIBDEVICE=True),
           dict(num_warps=4))
    lin = ptrs("bf16", "x_ptr", "w_ptr", "y_ptr", "bias_ptr", "norm_w_ptr") | ptrs(
        "fp32", "partial_ptr", "sums_ptr") | ptrs("i32", "lock_ptr") | ints(
        "M", "N", "stride_xm", "stride_ym", "num_tiles") | {"eps": "fp32"}
    # (split_k, block_k, stages): split-K, and plain products' deep K steps (linear.WHOLE_K)
    for split_k, block_k, stages in ((1, 128, 4), (2, 128, 4), (1, 256, 5)):
        # (label, gated, residual add + sums: the product before a norm, normed x: after,
        # x scaled by the norm's weight in the loop: else the weight is in w)
        for label, gated, add_res, norm_x, scale_x in (
                ("linear", False, False, False, False),
                ("gate/up + SiLU", True, False, False, False),
                ("linear + residual", False, True, False, False),
                ("normed linear", False, False, True, True),
                ("normed gate/up + SiLU", True, False, True, True),
                ("normed linear, prescaled w", False, False, True, False),
                ("normed gate/up + SiLU, prescaled w", True, False, True, False)):
            yield (f"{label} split_k={split_k} block_k={block_k}", linear._linear_kernel, lin,
                   dict(K=4096, BLOCK_M=32, BLOCK_N=32, BLOCK_K=block_k, SPLIT_K=split_k,
                        HAS_BIAS=split_k == 1 and not gated, GATED=gated, ADD_RES=add_res,
                        NORM_X=norm_x, SCALE_X=scale_x, T_PAD=128, LIBDEVICE=True),
                   dict(num_warps=4, num_stages=stages))
    attn = ptrs("bf16", "q_ptr", "k_ptr", "v_ptr", "out_ptr", "k_new_ptr", "v_new_ptr",
                "cos_ptr", "sin_ptr") | ptrs("fp32", "partial_acc_ptr", "partial_ml_ptr") | \
        ptrs("i32", "counters_ptr") | ptrs(
            "i64", "block_tables_ptr", "context_lens_ptr", "positions_ptr", "slot_ptr",
            "query_start_ptr") | ints(
            "stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_kt",
            "stride_kh", "stride_bt", "stride_knt", "stride_vnt", "stride_knh",
            "stride_table") | {"scale_log2": "fp32"}
    # (block_n, stages): the default tiles, and those of few (row, kv head) pairs
    for fuse, (block_n, stages) in itertools.product((False, True), ((64, 4), (128, 2))):
        for splits in (1, 4):
            yield (f"decode attention splits={splits} fuse_rope={fuse} block_n={block_n}",
                   pa._decode_kernel, attn,
                   dict(GROUP=4, BLOCK_M=16, HEAD_DIM=128, BLOCK_N=block_n, BLOCK_SIZE=16,
                        NUM_SPLITS=splits, IS_FP32=False, WHILE_LOOP=False, FUSE_ROPE=fuse,
                        MERGE_UNROLL=pa.MERGE_UNROLL),
                   dict(num_warps=4, num_stages=stages, enable_fp_fusion=not fuse))
    yield ("prefill attention", pa._prefill_kernel, attn,
           dict(GROUP=4, GROUP_PAD=4, BLOCK_Q=16, HEAD_DIM=128, BLOCK_N=64, BLOCK_SIZE=16,
                IS_FP32=False, WHILE_LOOP=False), dict(num_warps=4, num_stages=2))
    slot = ptrs("i64", "header_ptr", "out_header_ptr", "ids_out", "positions_out",
                "slot_mapping_out", "context_lens_out", "block_tables_out") | ptrs(
        "i32", "input_ids_ptr", "positions_ptr", "slot_mapping_ptr", "context_lens_ptr",
        "block_tables_ptr", "placeholder_pos_ptr", "placeholder_src_ptr", "prev_ptr") | ints(
        "bt_stride", "prev_limit", "scratch_block", "scratch_slot")
    yield ("decode inputs", decode._decode_inputs_kernel, slot,
           dict(NUM_BLOCKS=512, H_NUM_ROWS=2, H_NUM_PLACEHOLDERS=3, H_SEQ=0, O_SEQ=0,
                O_NUM_ROWS=1, BLOCK_R=32, BLOCK_B=128), dict(num_warps=1))
    arg = ptrs("bf16", "logits_ptr") | ptrs("fp32", "part_val_ptr") | ptrs(
        "i32", "part_idx_ptr", "out_ptr") | ints("stride", "num_splits")
    yield ("argmax partial", decode._argmax_partial_kernel, arg,
           dict(VOCAB=128256, CHUNK=16384, BLOCK=2048), dict(num_warps=8))
    yield ("argmax final", decode._argmax_final_kernel, arg, dict(BLOCK_S=16),
           dict(num_warps=1))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run with TRITON_INTERPRET=0: the interpreter compiles nothing", file=sys.stderr)
        return 2
    failed = 0
    for label, kernel, types, constexprs, options in variants():
        try:
            compiled = compile_for_hopper(kernel, types, constexprs, **options)
            print(f"ok   {label}: {compiled.metadata.shared} B shared", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
