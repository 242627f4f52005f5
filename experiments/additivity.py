"""Question: is a mixed-precision allocation's loss the sum of its layers' single-layer losses (the assumption of the
kl sensitivity, ``allocate.measured``)?

Answer (SmolLM2-135M, 256 calibration tokens): nearly -- all layers at once are 1.04-1.35x the sum; the kl
allocations lost on wiki because 256 tokens do not stand for other text, not because the damage compounds.
Evidence: ``evidence/benchmarks/additivity/`` (docs/experiments.md, "measured sensitivity").

Run: python experiments/additivity.py --model runs/mixed-kl35-groups-min3

For a compressed folder, on the same calibration tokens the kl sensitivity scores (the first ``--kl-tokens`` c4
tokens of the calibration windows): (1) the sum over layers of KL(base || base with only that layer RTN'd at the
folder's bits/group size), (2) the KL of the base with *every* layer RTN'd at those choices at once, (3) the KL of the
folder itself (GPTQ, or whatever made it). (1) vs (2) is how far the layers' damage compounds; (2) vs (3) is what
the real quantizer does differently from the RTN the sensitivity assumed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_holo.hardware import ensure_fast_blas  # noqa: E402

ensure_fast_blas()


def main(argv=None) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_holo import data, model as models
    from mlx_holo.cli.common import progress_printer
    from mlx_holo.allocate.measured import kl_after, measured_errors, scored_tokens
    from mlx_holo.quant.rtn import quantize_rtn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="compressed folder (mlx-lm layout, per-layer overrides)")
    ap.add_argument("--base", default="default")
    ap.add_argument("--kl-tokens", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    qcfg = models.read_config(Path(args.model))["quantization"]
    base, tok = models.open_model(args.base)[:2]
    calib = data.calibration_windows(tok, data.load_corpus("c4"), args.calib_tokens, args.seq_len, args.seed)
    toks = scored_tokens(calib, args.kl_tokens)
    params = dict(tree_flatten(base.parameters()))
    mods = dict(base.named_modules())
    choice = {}  # weight path -> (bits, group) as the folder stores it
    for k, v in params.items():
        mod = k.rsplit(".", 1)[0]
        if not k.endswith(".weight") or v.ndim != 2 or not hasattr(mods[mod], "to_quantized"):
            continue
        q = qcfg.get(mod, {"bits": qcfg["bits"], "group_size": qcfg["group_size"]})
        if q is not False:
            choice[k] = (q["bits"], q["group_size"])

    def rtn(path, w, c):
        return quantize_rtn(w.astype(mx.float32), *c).dequantize()

    single = measured_errors(base, toks, list(choice), lambda p: [choice[p]], rtn, on_progress=progress_printer())
    total_single = sum(single[p][choice[p]] for p in choice)
    ref = base(toks).astype(mx.float32)  # the float model's logits, before its weights are replaced below
    for p, c in choice.items():
        m, n = p.rsplit(".", 1)
        setattr(mods[m], n, rtn(p, params[p], c))
    kl_rtn_all = kl_after(base, toks, ref)
    kl_folder = kl_after(models.open_model(args.model)[0], toks, ref)
    res = {"model": args.model, "layers": len(choice), "tokens": list(toks.shape),
           "sum_single_layer_kl": total_single, "kl_all_rtn": kl_rtn_all, "kl_folder": kl_folder}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
