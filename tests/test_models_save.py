import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_holo import model as models
from mlx_holo.compression import compress
from mlx_holo.recipe import Recipe, RecipeError


def test_missing_path_and_bad_folders(tmp_path):
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="config.json"):
        models.open_model(str(tmp_path / "empty"))


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(models.ModelError, match="unsupported architecture"):
        models.open_model(str(d))


def test_corrupt_and_missing_tensors(tiny_model_dir, tmp_path):
    import shutil
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(models.ModelError, match="corrupt safetensors"):
        models.open_model(str(d))
    d2 = tmp_path / "missing"
    shutil.copytree(tiny_model_dir, d2)
    w = mx.load(str(d2 / "model.safetensors"))
    w.pop("model.layers.1.mlp.down_proj.weight")
    mx.save_safetensors(str(d2 / "model.safetensors"), w)
    with pytest.raises(models.ModelError, match="do not match"):
        models.open_model(str(d2))


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 128), (8, 64), (4, -1)])
def test_save_roundtrip_with_stock_mlx_lm(tiny_model_dir, text_file, tmp_path, bits, group_size):
    from mlx_lm import load

    out = tmp_path / "q"
    ev = compress(str(tiny_model_dir), Recipe(method="rtn", bits=bits, group_size=group_size), str(out),
                  eval_tokens=256, eval_seq_len=128, eval_corpus=str(text_file))
    model, tok = load(str(out))
    lin = model.model.layers[0].mlp.down_proj
    assert type(lin).__name__ == "QuantizedLinear" and lin.bits == bits
    # stock mlx-lm output equals our dequantized evaluation model on the same tokens
    ours = models.open_model(str(out))[0]
    x = mx.array([[1, 5, 9, 200, 3]])
    np.testing.assert_allclose(np.array(model(x).astype(mx.float32)), np.array(ours(x)), atol=2e-2, rtol=1e-2)
    assert ev["bytes"]["total"] == sum(v.nbytes for v in mx.load(str(out / "model.safetensors")).values())
    expected_bpw = bits + 32 / (group_size if group_size > 0 else 128)
    assert abs(ev["bits_per_weight"] - expected_bpw) < 1e-6
    assert (out / "evidence.json").exists()


def test_failure_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):

    out = tmp_path / "never"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["mlx_holo.compression"], "stream_compare", boom)  # evaluation fails
    with pytest.raises(KeyboardInterrupt):
        compress(str(tiny_model_dir), Recipe(bits=4), str(out), eval_tokens=256, eval_seq_len=128)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp folder left behind either


def test_existing_output_is_not_clobbered(tiny_model_dir, tmp_path, text_file):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        compress(str(tiny_model_dir), Recipe(bits=4), str(out), eval_tokens=0)
    assert (out / "keep.txt").read_text() == "mine"


def test_recipe_validation():
    for bad in (dict(bits=7), dict(group_size=16), dict(sparsity=1.5), dict(method="nope"), dict(nm="4:2"),
                dict(method="mixed"), dict(mode="int3"), dict(candidate_bits=(3, 7)),
                dict(fit="nope"), dict(method="mixed", bits=3, bits_per_weight=3.4),
                dict(method="mixed", bits=3, bits_per_weight=3.2, candidate_groups=(32, 64)),
                dict(method="rtn", embed_first=True), dict(method="gptq", embed_first=True, gptq_head=False)):
        with pytest.raises(RecipeError):
            Recipe(**bad).validate()
    r = Recipe(method="mixed", bits=2, bits_per_weight=3.0).validate()
    assert Recipe.from_dict(r.to_dict()) == r
    # mixed precision's bit-widths: from --bits up by default, or exactly the given ones
    assert Recipe(method="mixed", bits=3, bits_per_weight=3.5).validate().mixed_bits() == (3, 4, 5, 6, 8)
    assert Recipe(method="mixed", bits=3, bits_per_weight=3.25, candidate_groups=(64, 128)).validate()
    assert Recipe(method="mixed", bits=4, bits_per_weight=3.0, candidate_bits=(2, 4)).validate().mixed_bits() == (2, 4)


def test_cli_clear_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "mlx_holo.compress", *args], capture_output=True, text=True,
                              timeout=300)
    r = run("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run("--bits", "7", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "bits=7" in r.stderr
    r = run("--method", "mixed", "--bits-per-weight", "3", "--candidate-bits", "3,x", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    r = run("--method", "mixed", "--bits-per-weight", "3", "--candidate-bits", "3,7", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "candidate_bits" in r.stderr
    assert not (tmp_path / "o").exists()


def test_replace_tensors_in_place(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    before = models.load_weights(folder)
    key = "model.layers.0.mlp.down_proj.weight"
    new = mx.ones(before[key].shape, dtype=mx.float32) * 0.5
    models.replace_tensors(folder, {key: new})
    after = models.load_weights(folder)
    assert after[key].dtype == before[key].dtype and mx.array_equal(after[key], new.astype(before[key].dtype)).item()
    assert set(after) == set(before)
    assert all(mx.array_equal(after[k], before[k]).item() for k in before if k != key)
    assert [p.name for p in folder.iterdir() if p.suffix == ".safetensors"] == ["model.safetensors"]
    with pytest.raises(models.ModelError, match="no tensors"):
        models.replace_tensors(folder, {"model.nope.weight": new})
    assert [p.name for p in folder.iterdir() if p.suffix == ".safetensors"] == ["model.safetensors"]


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_folder_asking_to_run_its_own_code_is_refused(tiny_model_dir, tmp_path, where):
    """A folder with an auto_map (custom Python classes) is refused before any code could run or any prompt appear."""
    import shutil

    d = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / where).read_text())
    cfg["auto_map"] = {"AutoTokenizer": "tok.MyTokenizer", "AutoModelForCausalLM": "model.MyModel"}
    (d / where).write_text(json.dumps(cfg))
    (d / "tok.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(models.ModelError, match="never runs code from a model folder"):
        models.open_model(str(d))
    r = subprocess.run([sys.executable, "-m", "mlx_holo.eval", "--model", str(d)], capture_output=True, text=True,
                       input="y\n", env={**__import__("os").environ, "MLX_HOLO_NO_REEXEC": "1"}, timeout=120)
    assert r.returncode == 2 and "never runs code" in r.stderr and r.stdout == ""


def test_shard_digests_taken_at_write_time_match_the_files(tmp_path):
    """The writer hashes each shard as it writes it; evidence.file_hashes reuses those digests only while a file's
    size and mtime are unchanged, and reads a rewritten file again."""
    import os

    from mlx_holo import evidence
    from mlx_holo.model.save import FolderWriter

    out = tmp_path / "f"
    out.mkdir()
    w = FolderWriter(out, default_bits=None, default_group_size=64, shard_bytes=1000)  # a shard an add
    for i in range(3):
        w.add({f"model.layers.{i}.w": mx.random.normal((40, 20), key=mx.random.key(i))})
    w.close({"model_type": "llama"}, None)
    assert sorted(w.digests) == sorted(p.name for p in out.glob("*.safetensors")) and len(w.digests) == 3
    fresh = evidence.file_hashes(out)
    assert evidence.file_hashes(out, w.digests) == fresh
    f = out / sorted(w.digests)[0]
    mx.save_safetensors(str(f), {"model.layers.0.w": mx.zeros((40, 20))})  # rewritten in place (e.g. E2E tuning)
    os.utime(f, ns=(w.digests[f.name][1] + 10**9, w.digests[f.name][1] + 10**9))
    again = evidence.file_hashes(out, w.digests)
    assert again[f.name] == evidence.sha256_file(f) != fresh[f.name]
