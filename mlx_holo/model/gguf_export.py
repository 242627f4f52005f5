"""GGUF output: an mlx-lm folder (a compressed one of ours, or a float one) -> one GGUF file for llama.cpp.

llama.cpp's Q4_1 and Q5_1 blocks are MLX's affine format at group size 32: per block of 32 weights an fp16 scale
``d`` and minimum ``m`` with ``w = d * q + m`` (Q4_1: 16 bytes of nibbles, the block's first 16 codes in the low
nibbles and the last 16 in the high ones; Q5_1: the fifth bits in a little-endian uint32 ``qh`` before them). An
MLX 4- or 5-bit layer at group 32 is written with ``d = scale``, ``m = bias`` and its codes unchanged: no second
rounding. Q8_0 is symmetric, ``w = d * q`` with q an int8: an 8-bit group-32 layer maps when its bias is exactly
``-128 * scale`` (then ``q_gguf = q - 128``). Every other quantized layer (another group size or bit-width, MLX's
float modes) is refused with the list of layers, unless ``requantize``: it is then dequantized and quantized again by
the ``gguf`` package's own quantizer to the nearest GGUF type of at least its bits (Q4_1, Q5_1 or Q8_0), and the
report gives each such layer's extra relative error. Float tensors are written F16 (matrices) or F32 (norms,
biases).

Tensor names and metadata are llama.cpp's for the ``llama`` and ``qwen2`` architectures (``convert_hf_to_gguf.py``):
``token_embd``, ``blk.N.attn_q`` ..., ``output_norm``, ``output``; llama's q/k rows are permuted the way llama.cpp
expects (whole rows, so codes, scales and biases move together). The tokenizer (a byte-level BPE ``tokenizer.json``)
goes in as ``tokenizer.ggml.*``. The file is written tensor by tensor (header first, then each tensor read, packed
and written), into a temporary file renamed when complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from ..quant.formats import dequantize_f32, unpack
from .files import ModelError, load_file, read_config, weight_files
from .gguf import GGUF_NAMES, OUTSIDE_NAMES, permute_rows

ARCHS = ("llama", "qwen2")
QK = 32  # GGUF block size of Q4_1 / Q5_1 / Q8_0
BLOCK_PARTS = {v: k for k, v in GGUF_NAMES.items()}  # mlx-lm module path inside a block -> llama.cpp's name
OUTSIDE_KEYS = {v: k for k, v in OUTSIDE_NAMES.items()}  # HF name of a tensor outside the blocks -> llama.cpp's


class GGUFExportError(ModelError):
    """A folder that cannot be written as GGUF as asked (architecture, tokenizer, layers that do not map)."""


@dataclass
class ExportReport:
    path: str = ""
    tensors: dict = field(default_factory=dict)       # GGUF name -> GGML type name
    requantized: dict = field(default_factory=dict)   # GGUF name -> relative error of the second rounding
    bytes: int = 0

    def to_dict(self) -> dict:
        return {"path": self.path, "tensors": self.tensors, "requantized": self.requantized, "bytes": self.bytes}


def gguf_name(key: str) -> str | None:
    """An HF / mlx-lm tensor name -> its llama.cpp name (None: not written)."""
    if key in OUTSIDE_KEYS:
        return OUTSIDE_KEYS[key]
    parts = key.split(".")
    if key.startswith("model.layers.") and len(parts) >= 5:
        i, mod, leaf = parts[2], ".".join(parts[3:-1]), parts[-1]
        if mod in BLOCK_PARTS and leaf in ("weight", "bias"):
            return f"blk.{i}.{BLOCK_PARTS[mod]}.{leaf}"
    return None


# ---- block packing: MLX affine codes [R, C] (C % 32 == 0), fp16 scales/biases [R, C / 32] -> GGUF bytes [R, *] ----

def _fp16_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(*a.shape, 2)


def pack_q4_1(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """-> uint8 [R, C / 32 * 20]: per block d, m (fp16) then 16 bytes, code j | code j+16 << 4."""
    r, c = codes.shape
    q = codes.reshape(r, c // QK, 2, QK // 2).astype(np.uint8)
    qs = q[:, :, 0] | (q[:, :, 1] << np.uint8(4))
    return np.concatenate([_fp16_bytes(scales), _fp16_bytes(biases), qs], axis=-1).reshape(r, -1)


def pack_q5_1(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """-> uint8 [R, C / 32 * 24]: per block d, m (fp16), qh (bit 4 of code j at bit j), then Q4_1's nibbles."""
    r, c = codes.shape
    q = codes.reshape(r, c // QK, QK).astype(np.uint8)
    qh = np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")  # [R, G, 4]
    lo = (q & np.uint8(0x0F)).reshape(r, c // QK, 2, QK // 2)
    qs = lo[:, :, 0] | (lo[:, :, 1] << np.uint8(4))
    return np.concatenate([_fp16_bytes(scales), _fp16_bytes(biases), qh, qs], axis=-1).reshape(r, -1)


def pack_q8_0(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """-> uint8 [R, C / 32 * 34]: per block d (fp16) then 32 int8 codes q - 128."""
    r, c = codes.shape
    q = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8).reshape(r, c // QK, QK)
    return np.concatenate([_fp16_bytes(scales), q], axis=-1).reshape(r, -1)


@dataclass
class _Tensor:
    key: str           # HF / mlx-lm name of the weight (or bias / norm)
    name: str          # GGUF name
    shape: tuple       # logical shape [rows, cols] (or [n])
    qtype: str         # "F32", "F16", "Q4_1", "Q5_1", "Q8_0"
    source: str        # "float", "exact" or "requantize"
    bits: int = 0
    group: int = 0
    mode: str = "affine"


def _layer_format(qcfg: dict, path: str) -> tuple[int, int, str]:
    own = qcfg.get(path)
    if isinstance(own, dict):
        return own.get("bits", qcfg["bits"]), own.get("group_size", qcfg["group_size"]), own.get("mode", "affine")
    return qcfg["bits"], qcfg["group_size"], qcfg.get("mode", "affine")


def _target(bits: int) -> str:
    return "Q4_1" if bits <= 4 else "Q5_1" if bits == 5 else "Q8_0"


def plan_tensors(folder: str | Path) -> tuple[list[_Tensor], dict, dict]:
    """A folder -> (the tensors to write, in order, each with its GGUF type and how it gets there; config;
    {tensor key: shard file}). Raises GGUFExportError for an architecture or tensor llama.cpp would not read."""
    folder = Path(folder)
    config = read_config(folder)
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise GGUFExportError(f"GGUF export supports the {', '.join(ARCHS)} architectures; {folder} is {arch!r}")
    if config.get("rope_scaling") not in (None, {}) and (config["rope_scaling"].get("type")
                                                         or config["rope_scaling"].get("rope_type")) != "default":
        raise GGUFExportError(f"{folder}: rope_scaling {config['rope_scaling']} is not carried into GGUF by mlx-holo")
    qcfg = config.get("quantization") or config.get("quantization_config") or {}
    where, headers = {}, {}
    for f in weight_files(folder):
        for k, v in load_file(f).items():
            where[k], headers[k] = f, (tuple(v.shape), v.dtype)
    out = []
    for key in sorted(where, key=_order):
        if key.endswith((".scales", ".biases")) and key.rsplit(".", 1)[0] + ".weight" in where:
            continue
        name = gguf_name(key)
        if name is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise GGUFExportError(f"{folder}: tensor {key} has no llama.cpp name")
        shape, dtype = headers[key]
        path = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and path + ".scales" in where:
            bits, g, mode = _layer_format(qcfg, path)
            cols = shape[1] * 32 // bits
            exact = mode == "affine" and g == QK and bits in (4, 5, 8)
            out.append(_Tensor(key, name, (shape[0], cols), _target(bits), "exact" if exact else "requantize",
                               bits, g, mode))
        elif len(shape) == 2:
            out.append(_Tensor(key, name, shape, "F16", "float"))
        else:
            out.append(_Tensor(key, name, shape, "F32", "float"))
    return out, config, where


def _order(key: str) -> tuple:
    """llama.cpp's tensor order: the embedding, the blocks in order, then the final norm and the output head."""
    if key.startswith("model.layers."):
        return (1, int(key.split(".")[2]), key)
    return (0 if "embed" in key else 2, 0, key)


def _load(where: dict, key: str) -> mx.array:
    return load_file(where[key])[key]


def symmetric_grid(scales: np.ndarray, biases: np.ndarray | None) -> bool:
    """Is an 8-bit affine grid Q8_0's, bias == -128 * scale in every group?"""
    return biases is not None and bool(np.array_equal(biases.astype(np.float32), -128.0 * scales.astype(np.float32)))


def tensor_bytes(t: _Tensor, where: dict, n_head: int, n_kv: int, permute: bool) -> tuple[np.ndarray, float | None]:
    """One planned tensor -> (its GGUF data: uint8 blocks [rows, bytes] or a float array, the relative error of a
    second rounding or None)."""
    path = t.key.rsplit(".", 1)[0]
    heads = n_head if ".attn_q." in t.name else n_kv if ".attn_k." in t.name else 0
    rows = (lambda a: permute_rows(a, heads)) if permute and heads else (lambda a: a)
    if t.source == "float":  # (a quantized layer's bias too)
        a = np.asarray(_load(where, t.key).astype(mx.float32))
        return rows(a).astype(np.float16 if t.qtype == "F16" else np.float32), None
    w = _load(where, t.key)
    scales = np.asarray(_load(where, path + ".scales").astype(mx.float32))
    biases = np.asarray(_load(where, path + ".biases").astype(mx.float32)) if path + ".biases" in where else None
    if t.source == "exact" and (t.qtype != "Q8_0" or symmetric_grid(scales, biases)):
        codes = rows(np.asarray(unpack(w, t.bits, t.shape[1])))
        scales, biases = rows(scales), rows(biases)
        if t.qtype == "Q4_1":
            return pack_q4_1(codes, scales, biases), None
        if t.qtype == "Q5_1":
            return pack_q5_1(codes, scales, biases), None
        return pack_q8_0(codes, scales), None
    if t.source == "exact":  # an 8-bit group-32 layer on an asymmetric grid
        raise GGUFExportError(f"{t.key}: an 8-bit layer whose grid is not symmetric does not map to Q8_0")
    dq = np.asarray(dequantize_f32(w, mx.array(scales), None if biases is None else mx.array(biases), t.group,
                                   t.bits, t.mode).astype(mx.float32))
    dq = rows(dq)
    qtype = getattr(gguf.GGMLQuantizationType, t.qtype)
    data = gguf.quants.quantize(dq, qtype)
    back = gguf.quants.dequantize(data, qtype).reshape(dq.shape)
    err = float(((back - dq) ** 2).sum() / max(float((dq ** 2).sum()), 1e-30))
    return data, err


def export_gguf(folder: str | Path, out: str | Path, *, requantize: bool = False, on_progress=None) -> ExportReport:
    """Write ``folder`` (an mlx-lm folder of a llama or qwen2 model) as the GGUF file ``out`` (module docstring).
    -> ExportReport. Nothing is left at ``out`` unless the whole file was written."""
    folder, out = Path(folder), Path(out)
    plan, config, where = plan_tensors(folder)
    bad = [t.key.rsplit(".", 1)[0] for t in plan if t.source == "requantize"]
    if bad and not requantize:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise GGUFExportError(f"{len(bad)} quantized layer(s) do not map exactly to a GGUF type (Q4_1/Q5_1 need "
                              f"4/5 bits at group size 32, Q8_0 8 bits on a symmetric grid): {shown}; compress with "
                              "--group-size 32 (and bits 4, 5 or 8), or pass --requantize to round them again")
    arch = config["model_type"]
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    tmp = out.with_name(f".{out.name}.partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        _metadata(w, config, folder, plan)
        for t in plan:
            qtype = getattr(gguf.GGMLQuantizationType, t.qtype)
            if t.qtype in ("F16", "F32"):
                nbytes = int(np.prod(t.shape)) * (2 if t.qtype == "F16" else 4)
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float16 if t.qtype == "F16" else np.float32), nbytes)
            else:
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                nbytes = t.shape[0] * t.shape[1] // block * size
                w.add_tensor_info(t.name, (t.shape[0], t.shape[1] // block * size), np.dtype(np.uint8), nbytes,
                                  raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        report = ExportReport(path=str(out.resolve()))
        for i, t in enumerate(plan):
            data, err = tensor_bytes(t, where, n_head, n_kv, permute=arch == "llama")
            w.write_tensor_data(np.ascontiguousarray(data))
            report.tensors[t.name] = t.qtype
            if err is not None:
                report.requantized[t.name] = err
            if on_progress:
                on_progress("export", i + 1, len(plan))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    report.bytes = out.stat().st_size
    return report


def _file_type(plan: list[_Tensor]) -> int:
    """general.file_type: the llama.cpp ftype of the most common matrix type (MOSTLY_Q4_1 = 3, ...)."""
    from collections import Counter

    ftypes = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7, "Q5_1": 9}
    counts = Counter(t.qtype for t in plan if len(t.shape) == 2)
    return ftypes[counts.most_common(1)[0][0]] if counts else 0


def _metadata(w, config: dict, folder: Path, plan: list[_Tensor]) -> None:
    arch = config["model_type"]
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // n_head
    w.add_name(config.get("_name_or_path") or folder.name)
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(hidden)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads", n_head))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(_file_type(plan))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(w, config, folder, arch)


PRE_TOKENIZERS = {("qwen2", None): "qwen2", ("llama", 128256): "llama-bpe", ("llama", 49152): "smollm"}


def _tokenizer(w, config: dict, folder: Path, arch: str) -> None:
    """tokenizer.json (byte-level BPE) -> tokenizer.ggml.* (gpt2 model, tokens by id, types, merges, specials)."""
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json (GGUF export needs a byte-level BPE tokenizer)")
    tok = json.loads(tj.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{tj}: tokenizer model {model.get('type')!r} is not BPE")
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    n = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # llama.cpp token types: 1 normal, 3 control, 4 user-defined, 5 unused
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = 3 if t in added and added[t].get("special") else 4 if t in added else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    pre = config.get("mlx_holo_gguf_pre") or PRE_TOKENIZERS.get((arch, None)) or \
        PRE_TOKENIZERS.get((arch, config["vocab_size"]), "default")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}

    def tid(name):
        v = tc.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if v is not None else None

    for key, adder in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                       ("unk_token", w.add_unk_token_id), ("pad_token", w.add_pad_token_id)):
        i = tid(key)
        if i is not None:
            adder(i)
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])

