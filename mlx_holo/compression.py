"""compress(): open a model, calibrate, compress it block by block, save an mlx-lm folder, evaluate, write evidence.

The output folder opens with stock ``mlx_lm.load``; ``evidence.json`` beside the weights records what was done and
measured, with gates and a GO/NO-GO verdict. Everything is written to a temp folder first and renamed at the end.
The command line is ``python -m mlx_holo.compress`` or ``mlx-holo compress`` (``mlx_holo.cli.compress``).

The stages, top down: calibration windows (``data``) -> allocation (mixed precision's bits, the pruners' per-block
sparsity; ``allocate``) -> the block loop (``pipeline.run``) -> save (``model.save``) -> optional end-to-end tuning
of the saved scales (``tune.e2e``) -> evaluation against the base (``evaluation``) -> evidence (``evidence``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import mlx.core as mx

from . import data, evidence, hardware, preflight
from .data import DataError
from .distributed import DistributedError, check_distributable, world_from_env
from .allocate.mixed import mixed_allocation
from .allocate.sparsity import allocate_sparsity
from .evaluation import compare, stream_compare
from .model.files import prefetcher, reloader
from .model.gguf_export import ARCHS as GGUF_ARCHS, GGUFExportError, export_gguf
from .model.open import open_model
from .model.save import SHARD_BYTES, FolderWriter, atomic_dir, check_out, rank_dir, replace_tensors
from .options import PRUNE_METHODS
from .pipeline.head import forward_head_inputs
from .pipeline.run import run
from .quant.rotate import CONFIG_KEY as ROTATION_KEY, config_rotation
from .prune.report import sparsity_report
from .recipe import Recipe
from .tune.e2e import tune_folder


def compress(model: str | None, recipe: Recipe | None = None, out: str | Path = "", *, eval_tokens: int = 8192,
             eval_seq_len: int = 512, eval_corpus: str = "wiki", gates: list[str] | None = None,
             overwrite: bool = False, base_model=None, shard_bytes: int = SHARD_BYTES,
             max_memory_gb: float | None = None, gguf_file: bool = False, on_progress=None) -> dict:
    """Compress ``model`` (a model spec, see ``model.open``) with ``recipe`` (default: ``Recipe()``, RTN 4-bit g64)
    into the folder ``out`` -> evidence dict (also written to out/evidence.json).

    eval_*: how the result is scored against the base (``eval_tokens`` 0 skips it; the gates then fail).
    gates: GO/NO-GO gates (default ``evidence.DEFAULT_GATES``). base_model: an already opened float base
    (``model.open_model(model)[0]``) to score against; reusing one object across calls lets ``evaluation.compare``
    reuse its cached base outputs; without it, the base and the result are scored block by block
    (``evaluation.stream_compare``), neither held whole. shard_bytes: the output is written in shards of about this
    size as the blocks finish. max_memory_gb: the memory the run may use (default: what the machine has
    available); the pre-flight (``preflight.check``) refuses a run whose estimated peak exceeds it, before any work.
    gguf_file: also write the result as ``out/model.gguf`` for llama.cpp (``model.gguf_export``; needs
    ``recipe.gguf``'s grids, so nothing is rounded twice; recorded in the evidence and its file hashes).
    on_progress(stage, done, total): progress of every long loop."""
    if not out:
        raise ValueError("compress needs an output folder (out)")
    recipe = (recipe or Recipe()).validate()
    check_out(out, overwrite)  # before any work: an existing or unwritable --out is refused now, not at the end
    if eval_tokens < 0 or (0 < eval_tokens < eval_seq_len):
        raise DataError(f"--eval-tokens {eval_tokens} gives no {eval_seq_len}-token window: use 0 (no evaluation) or "
                        f">= {eval_seq_len}")
    if gguf_file and not recipe.gguf:
        raise GGUFExportError("a GGUF output needs the grids GGUF stores exactly: add --gguf (group size 32, bits "
                              "4, 5 or 8)")
    world = world_from_env()
    if world.distributed:
        check_distributable(recipe, world.size, base_model)
        on_progress = on_progress if world.rank == 0 else None  # one progress line for the job
    t0 = time.perf_counter()
    base, tok, config, info = open_model(model, lazy=True, dequantize=True, stored_tables=True)  # nothing read yet
    if gguf_file and info.model_type not in GGUF_ARCHS:
        raise GGUFExportError(f"GGUF output supports the {', '.join(GGUF_ARCHS)} architectures, not {info.model_type}")
    memory = preflight.check(config, recipe, max_memory_gb=max_memory_gb, eval_tokens=eval_tokens,
                             eval_seq_len=eval_seq_len, shard_bytes=shard_bytes)
    calib = corpus_c = None
    if recipe.needs_calibration():
        corpus_c = data.load_corpus(recipe.calib_corpus)
        calib = data.calibration_windows(tok, corpus_c, recipe.calib_tokens, recipe.calib_seq_len, recipe.seed)
        if world.distributed and calib.shape[0] < world.size:
            raise DistributedError(f"{calib.shape[0]} calibration windows cannot be shared by {world.size} ranks: "
                                   f"raise --calib-tokens to at least {world.size * recipe.calib_seq_len}")
    details = {}
    layer_bits = layer_sparsity = None
    if recipe.method == "mixed":
        layer_bits, details["allocation"] = mixed_allocation(model, calib, recipe, on_progress=on_progress)
    if recipe.method in PRUNE_METHODS and recipe.allocation != "uniform":
        layer_sparsity, details["allocation"] = allocate_sparsity(model, calib, recipe, on_progress=on_progress)
    head_x_first = None
    if recipe.embed_first and calib is not None:
        head_x_first = forward_head_inputs(open_model(model, lazy=True, dequantize=True)[0], calib)
    # rank 0 writes the output; every other rank of a distributed job a private copy, for its share of evaluation
    with (atomic_dir(out, overwrite=overwrite) if world.rank == 0 else rank_dir(out, world.rank)) as tmp:
        writer = FolderWriter(tmp, default_bits=recipe.bits, default_group_size=max(recipe.group_size, 32)
                              if recipe.group_size != -1 else 128, mode=recipe.mode, shard_bytes=shard_bytes)
        res = run(base, calib, recipe, layer_bits=layer_bits, layer_sparsity=layer_sparsity,
                  head_x_first=head_x_first, sink=writer.add, prefetch=prefetcher(Path(info.path)),
                  reload=reloader(Path(info.path)), world=world, on_progress=on_progress)
        del head_x_first, base
        rotation = res.extra.get("rotation")
        if rotation:  # the rotated model: its own head, and the rotation that evaluation undoes for the cosines
            config = dict(config, **{ROTATION_KEY: {k: rotation[k] for k in ("kind", "seed", "dim")}},
                          **({"tie_word_embeddings": False} if rotation["untied"] else {}))
        nbytes = writer.close(config, info.path, {r.name for r in res.layers if r.bits is None}
                              if recipe.bits is not None else None)
        compress_s = time.perf_counter() - t0
        if res.extra.get("group_fallback"):
            fb = res.extra["group_fallback"]
            kept = sorted(k for k, g in fb.items() if g is None)
            print(f"note: group size {recipe.group_size} does not divide the input width of {len(fb)} layer(s): "
                  f"{len(fb) - len(kept)} take a smaller group size, {len(kept)} stay float "
                  f"(evidence: group_fallback)", file=sys.stderr)
        mx.clear_cache()
        nbytes["original"] = 2 * info.n_params
        shards = nbytes.pop("shards")
        layers = res.layer_dicts()
        extra = dict(details, **res.extra)
        if recipe.method in PRUNE_METHODS:
            extra["sparsity"] = sparsity_report(tmp, layers, recipe.nm)
        bm = base_model
        e2e_s = 0.0
        if recipe.e2e_steps > 0:
            bm = bm if bm is not None else open_model(model)[0]
            extra["e2e_tune"], tensors, _ = tune_folder(tmp, bm, calib, steps=recipe.e2e_steps, lr=recipe.e2e_lr,
                                                     batch=recipe.e2e_batch, seed=recipe.seed, on_progress=on_progress)
            if tensors:
                replace_tensors(tmp, tensors)
            e2e_s = extra["e2e_tune"]["seconds"]
            mx.clear_cache()
        t1 = time.perf_counter()
        metrics: dict = {}
        corpus_e = data.load_corpus(eval_corpus)
        if eval_tokens > 0:
            wins = data.text_windows(tok, corpus_e, eval_tokens, eval_seq_len)
            if world.distributed and wins.shape[0] < world.size:
                raise DistributedError(f"{wins.shape[0]} evaluation windows cannot be shared by {world.size} ranks: "
                                       f"raise --eval-tokens to at least {world.size * eval_seq_len}")
            if bm is not None:  # a base held in memory (benchmarks scoring many variants against it)
                metrics = compare(open_model(str(tmp))[0], bm, wins, rotation=config_rotation(config),
                                  on_progress=on_progress).to_dict()
            else:  # neither model is held whole
                metrics = stream_compare(open_model(str(tmp), lazy=True, stored_tables=True)[0],
                                         open_model(model, lazy=True, stored_tables=True)[0], wins,
                                         rotation=config_rotation(config), world=world,
                                         on_progress=on_progress).to_dict()
            del bm
        else:
            wins = None
            metrics = {k: None for k in ("ppl", "base_ppl", "delta_ppl_pct", "kl", "top1", "cos_min",
                                         "determinism_delta")}
        if world.distributed:
            ranks = world.exchange_objects({"rank": world.rank, "block_seconds": [round(t, 3) for t in res.block_seconds],
                                            "sent_bytes_per_block": extra.pop("sent_bytes_per_block", []),
                                            "collective_wait_s": round(world.wait_s, 3),
                                            "ranks_on_host": world.local, "threads": world.threads,
                                            "peak_rss_bytes": hardware.peak_rss()})
            extra["distributed"] = {"world_size": world.size, "ranks": ranks}
            if world.rank != 0:
                return {}
        if gguf_file:
            rep = export_gguf(tmp, tmp / "model.gguf")
            extra["gguf"] = {"path": str(Path(out).resolve() / "model.gguf"), "bytes": rep.bytes,
                             "tensors": len(rep.tensors), "requantized": rep.requantized}
        bos = data.bos_id(tok) is not None  # the windows' convention: BOS first when the tokenizer adds one
        corpora = {"evaluation": corpus_e.record(int(wins.size) if wins is not None else 0, bos)}
        if corpus_c is not None:
            corpora["calibration"] = corpus_c.record(int(calib.size), bos)
        n_quant = writer.n_quant_params
        files = evidence.file_hashes(tmp, writer.digests)  # what validate --folder checks the folder against
        ev = evidence.build(
            model={"id": info.id, "path": str(Path(info.path).resolve()), "hash": info.hash, "model_type": info.model_type,
                   "n_params": info.n_params},
            recipe=recipe.to_dict(), corpora=corpora, nbytes=nbytes, n_quant_params=n_quant, metrics=metrics,
            environment=hardware.device_info(),
            timings={"compress_s": compress_s, "e2e_tune_s": e2e_s, "eval_s": time.perf_counter() - t1,
                     "total_s": time.perf_counter() - t0},
            peak_memory_bytes=hardware.peak_rss(), gates=gates or evidence.DEFAULT_GATES, layers=layers,
            output={"path": str(Path(out).resolve()), "shards": shards}, pipeline_peak_mlx_bytes=int(res.peak_memory_bytes),
            block_seconds=[round(t, 3) for t in res.block_seconds], memory_estimate=memory.to_dict(), files=files,
            command=" ".join(sys.orig_argv), **extra)
        evidence.write(ev, tmp / "evidence.json")
    return ev

