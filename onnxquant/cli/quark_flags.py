"""The quantize command's flags (named after AMD Quark's ONNX LLM example) and what each means in a recipe.

Without `--recipe`, the flags describe the whole recipe, starting from INT8_TRANSFORMER_DEFAULT with no
stages; with it, each flag given replaces that one setting of the recipe (`--recipe w8a8 --num_calib_data
32`). Errors name the flag, as the user wrote it.
"""

from __future__ import annotations

import argparse
import dataclasses

from onnxquant.errors import fail
from onnxquant.emitters.qdq import has_column_scales
from onnxquant.recipes import Grid, HadamardGroups, KVCache, Override, Quantize, R4, Recipe, Rotate, Smooth, load_recipe
from onnxquant.recipes.schema import HADAMARD_GROUP_SIZES, STAGE_TYPES
from onnxquant.algorithms.registry import algorithms
from onnxquant.schemes import COLUMN_SCALE_PLACEMENTS, SCHEMES, TIED_EMBEDDING_CHOICES, uint8_blocks
from onnxquant.spec import BLOCK_SIZES, E8M0_ROUNDINGS


def add_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--recipe", default=None, help="a built-in recipe (`onnxquant recipes` lists them) or a recipe file (YAML or JSON); "
                                       "the flags below then change only what they name")
    add("--print_recipe", action="store_true", help="print the recipe these flags mean (YAML) and exit, writing nothing")
    add("--config", default="INT8_TRANSFORMER_DEFAULT", help=f"scheme: {', '.join(SCHEMES)}")
    add("--block_size", type=int, default=None, help="blocked weight schemes: weights per block along K (16..256, power of two; default: the scheme's, 128 for 4-bit, 32 for MX, 16 for NVFP4)")
    add("--algo", choices=tuple(algorithms()), default=None,
        help="weight rounding (default rtn): " + "; ".join(f"{a.name}: {a.summary}" for a in algorithms().values()))
    add("--accuracy_level", type=int, default=0, help="MatMulNBits accuracy_level: 0, 1, 2 or 4 (int8 compute)")
    add("--clip_search", action="store_true", help="RTN: per-block clip ratio minimizing the block's error")
    add("--column_scales", choices=COLUMN_SCALE_PLACEMENTS, default=None,
        help="per-channel int8 weights: apply the column scales by a Mul after an integer MatMul with one scalar "
             "scale (default; faster decode on ORT's CPU kernels) or inside the fused kernel (in_kernel; no extra "
             "pass over the output, for prefill-heavy use)")
    add("--tied_embedding", choices=TIED_EMBEDDING_CHOICES, default=None,
        help="a tied embedding at 4 bits: shared reads lm_head's MatMulNBits table (one copy on disk, as the builder's "
             "shared_embeddings), separate writes its own, auto (default) shares when the model ties them and both "
             "get the same 4-bit grid")
    add("--mx_scale_rounding", choices=E8M0_ROUNDINGS, default=None,
        help="MX schemes: E8M0 block scales by OCP's floor rule (default; a block's largest values may saturate) "
             "or rceil (the smallest power of two that does not saturate)")
    add("--int8_nodes", action="append", default=[], help="blocked weight schemes: keep nodes matching this at 8 bits (repeatable), e.g. lm_head")
    add("--num_calib_data", type=int, default=64, help="number of calibration samples")
    add("--seq_len", type=int, default=512, help="tokens per calibration sample")
    add("--calib_data", default=None, help="calibration text file (default: the embedded WikiText-2 validation split)")
    add("--dataset", choices=("wikitext2", "pileval"), default=None,
        help="load this dataset from the Hugging Face hub with `datasets` instead of --calib_data")
    add("--use_moving_average", action="store_true", help="moving-average MinMax observers")
    add("--moving_average_constant", type=float, default=0.01)
    add("--calib_method", default="minmax", help="activation ranges: minmax, percentile+<p> (e.g. percentile+99.999) or mse (the range minimizing quantization error)")
    add("--exclude", action="append", default=[], help="leave nodes whose name contains this in float (repeatable)")
    add("--exclude_most_sensitive", type=int, default=0, metavar="N",
        help="mixed precision: keep the N MatMuls with the largest modelled output error (weight and activation grids, "
             "from the calibration Hessian) in float")
    add("--sequential", action="store_true",
        help="gptq: calibrate about one decoder layer at a time, each Hessian from the outputs of the layers already "
             "rounded (algorithm.sequential); about twice the calibration work")
    add("--hessian_token_stride", type=int, default=1, metavar="N",
        help="gptq, awq, --exclude_most_sensitive: gather the calibration Hessian from every N-th token of each sample "
             "(default 1: all); its in-graph products cost about as much as the model's own MatMuls, N divides that cost")
    add("--sq_num_calib_data", type=int, default=None, metavar="N",
        help="SmoothQuant: choose the scales from the channel maxima of the first N calibration samples (default: "
             "all); the quantizer's ranges and Hessians still use every sample. When R4 or Hadamard groups follow "
             "smoothing, the smoothing pass then runs on N samples only (the main job: 16 of 64)")
    add("--include_rotation", action="store_true", help="apply the QuaRot R1 rotation")
    add("--r_config_path", default=None, help="rotation config JSON (default: rotation_configs/<family>.json)")
    add("--hidden_size", type=int, default=None, help="rotation size; must equal the model's hidden size")
    add("--use_random_had", action="store_true", help="multiply the Hadamard by a seeded random ±1 diagonal")
    add("--seed", type=int, default=0)
    add("--hadamard_group_size", type=int, default=None,
        help="block-diagonal Hadamard groups of this size (16, 32, 64 or 128) on every quantized MatMul's input, folded into its weight")
    add("--include_r4", action="store_true",
        help="QuaRot R4: a full online Hadamard (in Kronecker-factored form) on every down_proj input, folded into its weight")
    add("--include_sq", action="store_true", help="apply SmoothQuant, folded into the graph")
    add("--sq_alpha", default=None,
        help="SmoothQuant migration strength in (0, 1) (default: the scheme's), or auto: each activation's alpha "
             "from 0.3..0.8 by the modelled output error of its readers (weight and activation grids, calibration Hessian)")
    add("--kv_cache_quant_scheme", choices=KV_CACHE_SCHEMES, default=None,
        help="quantize the KV cache inside GroupQueryAttention, as the ORT-GenAI builder's option of this name does "
             "(calibrated scales on post-RoPE K and V; int4 packs two values per byte); none keeps it float. fp8 needs "
             "a folder exported for cuda. With --skip_quantization only the cache is quantized")
    add("--kv_cache_calib_method", default=None,
        help="KV cache thresholds: minmax (default), percentile+<p> (per channel, e.g. percentile+99.99) or mse")
    add("--no_kv_rotary_envelope", action="store_true",
        help="calibrate K on its post-RoPE values as the window has them, not on each RoPE pair's norm (which bounds "
             "K at every position, also past the calibration window)")
    add("--skip_quantization", action="store_true", help="run only the graph passes; write a float model")
    add("--overwrite", action="store_true", help="replace a non-empty output folder")
    add("--verify", action="store_true", help="also check that each float stage (rotation, smoothing, Hadamard groups) left the logits exact")
    add("--collapse_ratio", type=float, default=2.5,
        help="refuse the result when its quick perplexity exceeds the float model's by this factor (0: no check)")
    add("--allow_degraded", action="store_true", help="keep the output even when the collapse guard fires")
    add("--segment_mb", type=float, default=1024,
        help="run calibration and the verification probe in consecutive pieces of the model holding about this many "
             "MB of weights each (a model within it runs whole), which bounds memory on large models")


KV_CACHE_SCHEMES = ("none", *(f"{dtype}_{granularity}" for dtype in ("int8", "int4", "fp8")
                                for granularity in ("per_tensor", "per_channel")))


def given_flags(parser_factory, argv: list[str]) -> set[str]:
    """The destinations of the flags `argv` gives (a parser whose defaults are all suppressed)."""
    parser = parser_factory()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _calib_method(value: str, flag: str = "--calib_method") -> dict:
    if value in ("minmax", "mse"):
        return {"method": value}
    head, _, number = value.partition("+")
    try:
        percentile = float(number or 99.999) if head == "percentile" else -1.0
    except ValueError:
        percentile = -1.0
    if not 50.0 < percentile <= 100.0:
        fail(f"{flag} {value!r} is not minmax, mse or percentile+<p> with p in (50, 100], e.g. percentile+99.999")
    return {"method": "percentile", "percentile": percentile}


def _alpha(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        alpha = float(value)
    except ValueError:
        alpha = float("nan")
    if not 0.0 < alpha < 1.0:
        fail(f"--sq_alpha must be between 0 and 1 (exclusive) or auto, got {value}")
    return alpha


def _apply_kv_cache_flags(args: argparse.Namespace, given: set[str], stages: dict) -> None:
    """--kv_cache_quant_scheme adds, replaces or (none) drops the kv_cache stage; the other KV flags change it."""
    tuning = [flag for flag in ("kv_cache_calib_method", "no_kv_rotary_envelope") if flag in given]
    if "kv_cache_quant_scheme" in given:
        if args.kv_cache_quant_scheme == "none":
            if tuning:
                fail(f"--{tuning[0]} applies to a quantized KV cache; drop it or pass a --kv_cache_quant_scheme other than none")
            stages.pop(KVCache.name, None)
            return
        dtype, _, granularity = args.kv_cache_quant_scheme.partition("_")
        stages[KVCache.name] = dataclasses.replace(stages.get(KVCache.name) or KVCache(), dtype=dtype, granularity=granularity)
    elif tuning and KVCache.name not in stages:
        fail(f"--{tuning[0]} applies to a quantized KV cache; add --kv_cache_quant_scheme (e.g. int8_per_channel)")
    if "kv_cache_calib_method" in given:
        method = _calib_method(args.kv_cache_calib_method, "--kv_cache_calib_method")
        if method["method"] == "mse" and stages[KVCache.name].dtype == "fp8":
            fail("--kv_cache_calib_method mse models integer rounding, not fp8's; use minmax or percentile+<p>")
        stages[KVCache.name] = dataclasses.replace(stages[KVCache.name], **method)
    if args.no_kv_rotary_envelope:
        stages[KVCache.name] = dataclasses.replace(stages[KVCache.name], rotary_envelope=False)


def recipe_from_flags(args: argparse.Namespace, given: set[str]) -> Recipe:
    """The recipe `args` mean: `--recipe` (or an empty INT8_TRANSFORMER_DEFAULT recipe) with each given flag applied."""
    recipe = load_recipe(args.recipe) if args.recipe else Recipe(stages=(Quantize(),))
    quantize = recipe.stage(Quantize) or Quantize()
    if "config" in given:
        if args.config not in SCHEMES:
            fail(f"unknown --config {args.config!r}; choose one of {', '.join(SCHEMES)}")
        quantize = dataclasses.replace(quantize, scheme=args.config, weights=None, activations=None, embedding=None,
                                       weight_only=False, keep_embedding_float=False)
    scheme = quantize.resolved_scheme()
    blocked = scheme.weights.granularity == "per_block"
    if "algo" in given and algorithms()[args.algo].folds_scales and scheme.activations is not None:
        fail(f"--algo awq applies to the weight-only schemes (its scales fold like SmoothQuant's, which "
             f"quantized activations take through --include_sq), not {scheme.name}; use --algo gptq or --include_sq")
    for flag, present in (("--block_size", "block_size" in given), ("--int8_nodes", bool(args.int8_nodes))):
        if present and not blocked:
            blocked_schemes = ", ".join(name for name, s in SCHEMES.items() if s.weights.granularity == "per_block")
            fail(f"{flag} applies to the blocked weight schemes ({blocked_schemes}), not {scheme.name}")
    if "block_size" in given:
        if args.block_size not in BLOCK_SIZES:
            fail(f"--block_size {args.block_size} is not a power of two in 16..256; use one of {', '.join(map(str, BLOCK_SIZES))}")
        scheme = scheme.with_block_size(args.block_size)
        quantize = quantize.with_grids_of(scheme)
    if "column_scales" in given and not has_column_scales(scheme.weights):
        per_channel = ", ".join(name for name, s in SCHEMES.items() if has_column_scales(s.weights))
        fail(f"--column_scales applies to the per-channel int8 weight schemes ({per_channel}), not {scheme.name}")
    if "accuracy_level" in given and args.accuracy_level not in (0, 1, 2, 4):
        fail(f"--accuracy_level {args.accuracy_level} is not 0, 1, 2 or 4")
    if "mx_scale_rounding" in given:
        if scheme.weights.scale_dtype != "e8m0":
            mx_schemes = ", ".join(name for name, s in SCHEMES.items() if s.weights.scale_dtype == "e8m0")
            fail(f"--mx_scale_rounding applies to the MX schemes ({mx_schemes}), not {scheme.name}")
        quantize = quantize.with_grids_of(scheme.with_scale_rounding(args.mx_scale_rounding))
    if "moving_average_constant" in given and not 0.0 < args.moving_average_constant <= 1.0:
        fail(f"--moving_average_constant must be in (0, 1], got {args.moving_average_constant}")
    observer = quantize.observer
    observer = dataclasses.replace(observer, **({"moving_average": True} if args.use_moving_average else {}),
                                   **({"averaging_constant": args.moving_average_constant} if "moving_average_constant" in given else {}),
                                   **(_calib_method(args.calib_method) if "calib_method" in given else {}))
    algorithm = quantize.algorithm
    name = args.algo if "algo" in given else algorithm.name
    if args.clip_search and name == "rtn":
        name = "clip_search"
    algorithm = dataclasses.replace(algorithm, name=name, **({"sequential": True} if args.sequential else {}))
    lowering = dataclasses.replace(quantize.lowering, **({"accuracy_level": args.accuracy_level} if "accuracy_level" in given else {}),
                                   **({"column_scales": args.column_scales} if "column_scales" in given else {}),
                                   **({"tied_embedding": args.tied_embedding} if "tied_embedding" in given else {}))
    block = scheme.weights.block_size or 128
    overrides = (*quantize.overrides, *(Override(p, weights=Grid.of(uint8_blocks(block))) for p in args.int8_nodes),
                 *(Override(p, keep_float=True) for p in args.exclude))
    if args.exclude_most_sensitive < 0:
        fail(f"--exclude_most_sensitive {args.exclude_most_sensitive} is negative; pass a count of MatMuls (0: none)")
    calibration = dataclasses.replace(recipe.calibration, **{key: getattr(args, flag) for flag, key in (
        ("num_calib_data", "samples"), ("seq_len", "seq_len"), ("calib_data", "text"), ("dataset", "dataset")) if flag in given})
    if calibration.samples < 1 or calibration.seq_len < 2:
        fail("--num_calib_data must be at least 1 and --seq_len at least 2")
    if "hessian_token_stride" in given:
        if not 1 <= args.hessian_token_stride <= calibration.seq_len:
            fail(f"--hessian_token_stride must be between 1 and --seq_len ({calibration.seq_len}), got {args.hessian_token_stride}")
        algorithm = dataclasses.replace(algorithm, hessian_token_stride=args.hessian_token_stride)
    quantize = dataclasses.replace(quantize, observer=observer, algorithm=algorithm, lowering=lowering, overrides=overrides,
                                   **({"exclude_most_sensitive": args.exclude_most_sensitive}
                                      if "exclude_most_sensitive" in given else {}))
    # Stages are edited as a table and the recipe built once at the end, so that no half-edited recipe
    # (new sample count, old smoothing samples) meets the recipe's own checks.
    stages = {stage.name: stage for stage in recipe.stages}
    stages[Quantize.name] = quantize
    if args.include_rotation:
        stages[Rotate.name] = Rotate(args.r_config_path, args.hidden_size, args.use_random_had, args.seed)
    if args.include_sq or ("sq_alpha" in given and Smooth.name in stages):
        smooth = stages.get(Smooth.name) or Smooth(scheme.sq_alpha)
        stages[Smooth.name] = dataclasses.replace(smooth, **({"alpha": _alpha(args.sq_alpha)} if "sq_alpha" in given else {}))
    elif "sq_alpha" in given:
        fail("--sq_alpha applies to SmoothQuant; add --include_sq or drop --sq_alpha")
    if "sq_num_calib_data" in given:
        if Smooth.name not in stages:
            fail("--sq_num_calib_data applies to SmoothQuant; add --include_sq or drop --sq_num_calib_data")
        if not 1 <= args.sq_num_calib_data <= calibration.samples:
            fail(f"--sq_num_calib_data must be between 1 and --num_calib_data ({calibration.samples}), got {args.sq_num_calib_data}")
        stages[Smooth.name] = dataclasses.replace(stages[Smooth.name], samples=args.sq_num_calib_data)
    if "hadamard_group_size" in given:
        if args.hadamard_group_size not in HADAMARD_GROUP_SIZES:
            fail(f"--hadamard_group_size {args.hadamard_group_size} is not one of {', '.join(map(str, HADAMARD_GROUP_SIZES))}")
        stages[HadamardGroups.name] = HadamardGroups(args.hadamard_group_size)
    if args.include_r4:
        stages[R4.name] = R4()
    _apply_kv_cache_flags(args, given, stages)
    if "collapse_ratio" in given and (args.collapse_ratio < 0 or 0 < args.collapse_ratio <= 1):
        fail(f"--collapse_ratio must be above 1 (or 0 to turn the check off), got {args.collapse_ratio}")
    if "segment_mb" in given and not 0 < args.segment_mb < float("inf"):
        fail(f"--segment_mb must be a positive number of MB, got {args.segment_mb:g}")
    verify = dataclasses.replace(recipe.verify, **({"exact_checks": True} if args.verify else {}),
                                 **({"allow_degraded": True} if args.allow_degraded else {}),
                                 **({"collapse_ratio": args.collapse_ratio} if "collapse_ratio" in given else {}))
    order = list(STAGE_TYPES)
    return dataclasses.replace(recipe, stages=tuple(sorted(stages.values(), key=lambda stage: order.index(stage.name))),
                               calibration=calibration, verify=verify,
                               **({"float_only": True} if args.skip_quantization else {}),
                               **({"segment_mb": args.segment_mb} if "segment_mb" in given else {}))

