#!/usr/bin/env python
"""Microsoft Olive (olive-ai 0.13) 4-bit weight-only quantization as a peer for onnxquant's benchmark.

Run with the Python of a venv that has olive-ai 0.13 (onnxquant.benchmark.peers runs it through
$ONNXQUANT_OLIVE_PYTHON; docs/guide/install.md says how to make one):

  olive_peer.py rtn  --onnx FLOAT_ONNX_FOLDER --output OUT [--block_size 128]
  olive_peer.py gptq --hf HF_FOLDER --onnx FLOAT_ONNX_FOLDER --output OUT [--block_size 128]
                     --calib_text FILE [--num_calib_data 64 --seq_len 512]

rtn:  Olive's OnnxBlockWiseRtnQuantization pass on FLOAT_ONNX_FOLDER's model.onnx (an ORT-GenAI export):
      every MatMul with a 2-D constant weight (lm_head included) -> MatMulNBits, and Gather with a
      constant table (an untied embedding) -> GatherBlockQuantized unless --skip_gather.
gptq: Olive's own Gptq pass (olive.passes.pytorch.gptq, runs on CPU) on the HF checkpoint, calibrated on
      the first N consecutive --seq_len-token windows of --calib_text (tokenized with the checkpoint's
      tokenizer.json, no special tokens, as onnxquant's calibration does); then the ORT-GenAI model builder
      (onnxruntime-genai 0.18, `-p int4`) turns the Olive-format checkpoint into MatMulNBits. Layers the
      checkpoint leaves float (lm_head unless --lm_head, the embedding) get the builder's own RTN at the
      same block size. Olive's ModelBuilder pass is NOT used: in Olive 0.13 it does not work with
      onnxruntime-genai 0.18 (it imports onnxruntime_genai.models.quantized_model, gone since 0.16, and
      calls create_model without the hf_details that 0.16+ require).

OUT gets model.onnx + model.onnx.data + genai_config.json + tokenizer files; sidecar files missing from
what Olive/the builder wrote are copied from FLOAT_ONNX_FOLDER. The last stdout line is
`OLIVE_PEER_RESULT {json}` with per-stage seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Olive queues a telemetry heartbeat on its first workflow even with OLIVE_DISABLE_TELEMETRY=1, and then
# waits ~10 s at exit retrying the upload (there is no network here); see _quiet_telemetry().
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SIDE_SKIP_SUFFIXES = (".onnx", ".onnx.data", ".data")


def log(msg: str) -> None:
    print(f"[olive_peer] {msg}", flush=True)


def fail(msg: str) -> None:
    sys.stderr.write(f"olive_peer: error: {msg}\n")
    sys.exit(2)


def _quiet_telemetry() -> None:
    from olive.telemetry import telemetry as olive_telemetry

    olive_telemetry.Telemetry._log_heartbeat = lambda self: None
    olive_telemetry.Telemetry().disable_telemetry()


def _system() -> dict:
    return {"local_system": {"type": "LocalSystem",
                             "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}}


def _run_workflow(input_model: dict, passes: dict, work: Path, data_configs: list | None = None) -> Path:
    from olive.workflows import run as olive_run

    _quiet_telemetry()
    out_dir = work / "olive_out"
    cfg = {
        "input_model": input_model,
        "systems": _system(),
        "passes": passes,
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(work / "olive_cache"),
        "output_dir": str(out_dir),
        "log_severity_level": 1,
    }
    if data_configs:
        cfg["data_configs"] = data_configs
    olive_run(cfg)
    return out_dir


def _decoder_filename(onnx_dir: Path) -> str:
    cfg = onnx_dir / "genai_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text())["model"]["decoder"]["filename"]
    return "model.onnx"


def _copy_sidecars(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(SIDE_SKIP_SUFFIXES) and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def _restore_output_names(model_path: Path, float_model_path: Path) -> list[str]:
    """Olive's RTN renames the output of each replaced MatMul to <name>_Q4, graph outputs included, so
    `logits` becomes `logits_Q4` and ORT-GenAI fails with "Model output was not found: logits". Rename back."""
    import onnx

    want = {o.name for o in onnx.load(str(float_model_path), load_external_data=False).graph.output}
    model = onnx.load(str(model_path), load_external_data=False)
    renames = {}
    for out in model.graph.output:
        for suffix in ("_Q4", "_Q8"):
            if out.name.endswith(suffix) and out.name[: -len(suffix)] in want:
                renames[out.name] = out.name[: -len(suffix)]
    if renames:
        for out in model.graph.output:
            out.name = renames.get(out.name, out.name)
        for node in model.graph.node:
            node.output[:] = [renames.get(x, x) for x in node.output]
        onnx.save(model, str(model_path))  # tensors stay in the external data file, references unchanged
    return sorted(renames)


def _op_counts(model_path: Path) -> dict:
    import collections

    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node if n.op_type in
                                    ("MatMul", "MatMulNBits", "Gather", "GatherBlockQuantized")))


def run_rtn(args, work: Path, timings: dict) -> None:
    onnx_dir = Path(args.onnx)
    fname = _decoder_filename(onnx_dir)
    float_model = onnx_dir / fname
    if not float_model.is_file():
        fail(f"{float_model} does not exist; --onnx must be an ORT-GenAI folder")
    nodes_to_exclude = None
    if args.skip_gather:
        import onnx

        m = onnx.load(str(float_model), load_external_data=False)
        nodes_to_exclude = [n.name for n in m.graph.node if n.op_type == "Gather"]
    rtn = {
        "type": "OnnxBlockWiseRtnQuantization",
        "bits": 4,
        "block_size": args.block_size,
        "is_symmetric": not args.asym,
        "accuracy_level": args.accuracy_level,
        "nodes_to_exclude": nodes_to_exclude,
        "save_as_external_data": True,
        "all_tensors_to_one_file": True,
        "external_data_name": f"{fname}.data",
    }
    t = time.time()
    out_dir = _run_workflow({"type": "ONNXModel", "model_path": str(onnx_dir), "onnx_file_name": fname},
                            {"rtn": rtn}, work)
    timings["olive_rtn_s"] = round(time.time() - t, 2)
    produced = out_dir / fname
    if not produced.is_file():
        produced = next(out_dir.glob("*.onnx"))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    shutil.move(str(produced), out / fname)
    data = produced.with_name(produced.name + ".data")
    if data.is_file():
        shutil.move(str(data), out / f"{fname}.data")
    renamed = _restore_output_names(out / fname, float_model)
    if renamed:
        log(f"renamed graph outputs back: {renamed}")
    copied = _copy_sidecars(onnx_dir, out)
    log(f"copied from the float folder: {copied}")


def _calib_windows(tokenizer_json: Path, text_file: Path, count: int, seq_len: int):
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    text = text_file.read_text(encoding="utf-8")
    needed = count * seq_len
    pieces, n, start = [], 0, 0
    while start < len(text) and n < needed:  # encode line-aligned chunks until there are enough tokens
        end = text.find("\n", start + (1 << 16))
        end = len(text) if end < 0 else end + 1
        ids = np.asarray(tok.encode(text[start:end], add_special_tokens=False).ids, dtype=np.int64)
        pieces.append(ids)
        n += len(ids)
        start = end
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if len(ids) < needed:
        fail(f"{text_file} has {len(ids)} tokens, fewer than {count} x {seq_len}; give more text or fewer samples")
    return ids[:needed].reshape(count, seq_len)


def _register_calib_dataset() -> None:
    from olive.data.registry import Registry

    @Registry.register_dataset("olive_peer_local_text")
    def olive_peer_local_text(tokenizer_json, text_file, num_samples=64, seq_len=512):
        import torch

        windows = torch.from_numpy(_calib_windows(Path(tokenizer_json), Path(text_file), num_samples, seq_len))
        # (inputs, label) pairs; the default dataloader (batch_size 1) adds the batch axis
        return [({"input_ids": w, "attention_mask": torch.ones_like(w)}, torch.tensor(0)) for w in windows]


def _check_gptq_shapes(hf: Path, block: int) -> None:
    cfg = json.loads((hf / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    dims = {k: cfg[k] for k in ("hidden_size", "intermediate_size") if k in cfg}
    if "head_dim" in cfg and "num_attention_heads" in cfg:
        dims["o_proj in (heads*head_dim)"] = cfg["head_dim"] * cfg["num_attention_heads"]
    bad = {k: v for k, v in dims.items() if v % block}
    if bad:
        fail(f"--block_size {block} does not divide {bad}; Olive's GPTQ checkpoint format and the builder's "
             f"Olive loader assume in_features % block_size == 0; pick a smaller --block_size")


def run_gptq(args, work: Path, timings: dict) -> None:
    if not args.hf:
        fail("gptq needs --hf (the float Hugging Face checkpoint folder)")
    if not args.calib_text:
        fail("gptq needs --calib_text: Olive's default calibration set is Salesforce/wikitext from the HF hub, "
             "which cannot be reached here")
    hf = Path(args.hf)
    _check_gptq_shapes(hf, args.block_size)
    tok_json = hf / "tokenizer.json"
    if not tok_json.is_file():
        tok_json = Path(args.onnx) / "tokenizer.json" if args.onnx else tok_json
    if not tok_json.is_file():
        fail("no tokenizer.json in --hf (or --onnx) for the calibration text")
    _register_calib_dataset()
    data_cfg = {"name": "olive_peer_calib", "load_dataset_config": {"type": "olive_peer_local_text", "params": {
        "tokenizer_json": str(tok_json.resolve()), "text_file": str(Path(args.calib_text).resolve()),
        "num_samples": args.num_calib_data, "seq_len": args.seq_len}}}
    gptq = {
        "type": "Gptq",
        "bits": 4,
        "group_size": args.block_size,
        "sym": not args.asym,
        "lm_head": args.lm_head,
        "damp_percent": args.damp_percent,
        "data_config": "olive_peer_calib",
    }
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t = time.time()
    out_dir = _run_workflow({"type": "HfModel", "model_path": str(hf)}, {"gptq": gptq}, work, [data_cfg])
    timings["olive_gptq_s"] = round(time.time() - t, 2)
    qckpt = out_dir / "model"
    if not (qckpt / "config.json").is_file():
        qckpt = out_dir
    log(f"Olive GPTQ checkpoint: {qckpt}")

    out = Path(args.output)
    staging = work / "built"
    cmd = [sys.executable, os.path.abspath(__file__), "_build", "-i", str(qckpt), "-o", str(staging),
           "-p", "int4", "-e", "cpu", "-c", str(work / "builder_cache"), "--extra_options",
           f"block_size={args.block_size}", f"is_symmetric={'false' if args.asym else 'true'}",
           f"accuracy_level={args.accuracy_level}"]
    log("building ONNX with the ORT-GenAI builder: " + " ".join(cmd[2:]))
    t = time.time()
    with open(work / "builder.log", "w") as blog:
        rc = subprocess.run(cmd, stdout=blog, stderr=subprocess.STDOUT).returncode
    timings["builder_s"] = round(time.time() - t, 2)
    if rc != 0:
        sys.stderr.write("\n".join((work / "builder.log").read_text(errors="replace").splitlines()[-25:]) + "\n")
        fail(f"the ORT-GenAI builder failed (exit {rc}); its last lines are above")
    out.mkdir(parents=True, exist_ok=True)
    for f in staging.iterdir():
        shutil.move(str(f), out / f.name)
    if args.onnx:
        copied = _copy_sidecars(Path(args.onnx), out)
        log(f"copied from the float folder: {copied}")


def builder_main(argv: list[str]) -> None:
    """`olive_peer.py _build <builder args>`: the ORT-GenAI 0.18 builder with two patches.

    1. Symmetric Olive checkpoints have no qzeros; the builder's packed-QKV helper torch.cat()s them
       anyway ("TypeError: expected Tensor as element 0 in argument 0, but got NoneType"). With None the
       MatMulNBits gets no zero_points input, i.e. the implicit 8 = Olive's symmetric zero point.
    2. transformers 5 per-layer-type RoPE configs (Gemma 3) flattened as the builder expects, by running it
       through onnxquant/builder_compat.py.
    """

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path)
    import torch
    from builders import base  # the module object the builder itself uses

    def packed_int4_class(self, q, k, v):
        if not hasattr(q, "qweight"):
            return self.make_packed_matmul_float_class(q, k, v)

        class PackedMatMul:
            def __init__(self):
                if not (q.bits == k.bits == v.bits) or not (q.group_size == k.group_size == v.group_size):
                    raise ValueError("q/k/v must share bits and group size for a packed MatMul")
                self.qweight = torch.cat([q.qweight, k.qweight, v.qweight], dim=0)
                self.scales = torch.cat([q.scales, k.scales, v.scales], dim=0)
                zs = [q.qzeros, k.qzeros, v.qzeros]
                self.qzeros = None if any(z is None for z in zs) else torch.cat(zs, dim=0)
                self.g_idx = q.g_idx
                self.in_features = q.in_features
                self.out_features = q.out_features + k.out_features + v.out_features
                self.bits = q.bits
                self.group_size = q.group_size

        return PackedMatMul()

    base.Model.make_packed_matmul_int4_class = packed_int4_class

    # onnxquant's own builder launcher (transformers 5's per-layer-type RoPE flattened), loaded by path: this
    # venv has no onnxquant installed, and builder_compat imports only the standard library at load time.
    spec = importlib.util.spec_from_file_location("builder_compat", Path(__file__).resolve().parents[1] / "onnxquant" / "builder_compat.py")
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    sys.argv = ["builder_compat", *argv]
    compat.main()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        builder_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("algo", choices=["rtn", "gptq"])
    p.add_argument("--hf", help="float HF checkpoint folder (gptq)")
    p.add_argument("--onnx", help="float ORT-GenAI folder (rtn input; sidecar files for both)")
    p.add_argument("--output", required=True, help="new ORT-GenAI folder")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--asym", action="store_true", help="asymmetric (zero points); default symmetric")
    p.add_argument("--accuracy_level", type=int, default=4, help="MatMulNBits accuracy_level (4 = int8 A on CPU)")
    p.add_argument("--skip_gather", action="store_true", help="rtn: keep Gather (embedding) tables float")
    p.add_argument("--lm_head", action="store_true", help="gptq: GPTQ the lm_head too (else builder RTN)")
    p.add_argument("--calib_text", help="gptq: UTF-8 text file for calibration")
    p.add_argument("--num_calib_data", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--damp_percent", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=0, help="gptq: torch threads (0 = torch default)")
    p.add_argument("--work_dir", help="keep Olive's cache/intermediates here (default: a temp dir, removed)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()

    if args.algo == "rtn" and not args.onnx:
        fail("rtn needs --onnx (the float ORT-GenAI folder)")
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            fail(f"{out} is not empty; pass --overwrite")
        shutil.rmtree(out)

    t0 = time.time()
    timings: dict = {}
    keep = args.work_dir is not None
    work = Path(args.work_dir) if keep else Path(tempfile.mkdtemp(prefix="olive_peer_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        (run_rtn if args.algo == "rtn" else run_gptq)(args, work, timings)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = round(time.time() - t0, 2)
    fname = _decoder_filename(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    result = {"algo": args.algo, "output": str(out), "block_size": args.block_size, "symmetric": not args.asym,
              "ops": _op_counts(out / fname), "size_mb": round(size / 2**20, 3), "files": sorted(
                  f.name for f in out.iterdir()), **timings}
    print("OLIVE_PEER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
