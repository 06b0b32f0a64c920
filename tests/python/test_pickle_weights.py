"""PyTorch `.bin` checkpoints (torch.save zip archives, sharded with pytorch_model.bin.index.json, as transformers'
`save_pretrained(safe_serialization=False)` writes them) give the same logits as the same weights in safetensors,
and are read without running pickle code: a pickle that names anything but torch's tensor-rebuild globals is
refused, and nothing in it runs."""
import json
import os
import pickle
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models
from conftest import DEVICE, IMAGES, run_stic

PROMPT = "[INST] <image>\nDescribe the image in detail. [/INST]"
IMAGE = IMAGES / "chelsea.png"


def score(folder, tmp_path, check=True):
    out = tmp_path / "logits.safetensors"
    proc = run_stic("score", "--model", folder, "--image", IMAGE, "--text", PROMPT, "--logits-out", out,
                    "--device", DEVICE, "--dtype", "f32", check=check, timeout=300)
    return load_file(out) if check else proc


def assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "panicked" not in proc.stderr and "RUST_BACKTRACE" not in proc.stderr, proc.stderr
    for needle in needles:
        assert str(needle) in proc.stderr, f"{needle!r} not in: {proc.stderr}"


def model_size(model):
    """Bytes of the model's distinct storages (tied and viewed tensors counted once, as transformers does)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return sum(storages.values())


def save_bin(model, folder):
    """`save_pretrained(safe_serialization=False)` in two shards, the safetensors removed: a pickle-only folder."""
    model.save_pretrained(folder, safe_serialization=False, max_shard_size=int(model_size(model) * 0.6))
    tiny_models.processor().save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    assert sorted(p.name for p in folder.glob("*.bin")) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert (folder / "pytorch_model.bin.index.json").is_file()
    return folder


def with_views_and_ties(model):
    """The decoder's first q and k projections become views of one storage (k at an offset), o_proj a transposed
    (non-contiguous) view, and the output layer the input embeddings' tensor itself."""
    attention = model.model.language_model.layers[0].self_attn
    with torch.no_grad():
        q, k = attention.q_proj.weight, attention.k_proj.weight
        joined = torch.cat([q.detach().flatten(), k.detach().flatten()])
        q.data = joined[: q.numel()].view(q.shape)
        k.data = joined[q.numel():].view(k.shape)
        o = attention.o_proj.weight
        o.data = o.detach().t().contiguous().t()
        model.lm_head.weight = model.get_input_embeddings().weight
    return model


def save_bin_with_views(model, folder):
    """Two shards and their index as save_pretrained(safe_serialization=False) writes them, but by torch.save of the
    state dict as it is (save_pretrained makes each tensor contiguous first), the decoder in the second shard."""
    model.config.save_pretrained(folder)
    tiny_models.processor().save_pretrained(folder)
    state = model.state_dict()
    decoder = [k for k in state if k.startswith("model.language_model.") or k == "lm_head.weight"]
    shards = {"pytorch_model-00001-of-00002.bin": [k for k in state if k not in decoder],
              "pytorch_model-00002-of-00002.bin": decoder}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / file)
    index = {"metadata": {"total_size": model_size(model)},
             "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="module")
def bin_folder(tmp_path_factory):
    return save_bin(tiny_models.build_model("gqa"), tmp_path_factory.mktemp("bin") / "model")


@pytest.mark.parametrize("weights", ["f32", "bf16_and_f16", "views_and_ties"])
def test_pickle_shards_give_the_logits_of_safetensors(tmp_path, weights):
    model = tiny_models.build_model("gqa")
    safetensors_folder = tmp_path / "safetensors"
    if weights == "bf16_and_f16":
        model.half()
        model.model.language_model.bfloat16()
    if weights == "views_and_ties":
        model = with_views_and_ties(model)
        # safetensors holds no views or shared tensors: the same values, each tensor on its own
        model.config.save_pretrained(safetensors_folder)
        tiny_models.processor().save_pretrained(safetensors_folder)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  safetensors_folder / "model.safetensors", metadata={"format": "pt"})
        bin_folder = save_bin_with_views(model, tmp_path / "bin")
        decoder = torch.load(bin_folder / "pytorch_model-00002-of-00002.bin", weights_only=True)
        q, k, o = (decoder[f"model.language_model.layers.0.self_attn.{m}_proj.weight"] for m in "qko")
        assert k.storage_offset() == q.numel() and not o.is_contiguous()
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        assert (decoder["lm_head.weight"].untyped_storage().data_ptr()
                == decoder["model.language_model.embed_tokens.weight"].untyped_storage().data_ptr())
    else:
        tiny_models.save_hf(model, safetensors_folder)
        bin_folder = save_bin(model, tmp_path / "bin")
    if weights == "bf16_and_f16":
        stored = {}
        for shard in bin_folder.glob("*.bin"):
            stored.update(torch.load(shard, weights_only=True))
        assert {t.dtype for t in stored.values()} == {torch.bfloat16, torch.float16}

    from_bin, from_safetensors = score(bin_folder, tmp_path), score(safetensors_folder, tmp_path)
    assert from_bin.keys() == from_safetensors.keys()
    for key in from_bin:
        # The same weights give the same logits, to the last bit in every local run; one CI run (2026-12-06, f32)
        # differed below the printed digits between the two processes, so the bound is a rounding, not equality:
        # a wrong or misread tensor moves the logits by orders of magnitude more.
        torch.testing.assert_close(from_bin[key], from_safetensors[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def torch_zip(path, pickled, storages=(), compression=zipfile.ZIP_STORED):
    """A file in torch.save's zip layout (`<archive>/data.pkl`, `<archive>/data/<key>`)."""
    archive = path.stem
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr(f"{archive}/data.pkl", pickled)
        z.writestr(f"{archive}/byteorder", "little")
        for key, data in storages:
            z.writestr(f"{archive}/data/{key}", data)
        z.writestr(f"{archive}/version", "3\n")


def pickle_only_copy(bin_folder, tmp_path):
    folder = shutil.copytree(bin_folder, tmp_path / "model")
    for f in [*folder.glob("*.bin"), folder / "pytorch_model.bin.index.json"]:
        f.unlink()
    return folder


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_malicious_pickle_is_refused_and_nothing_runs(bin_folder, tmp_path, protocol):
    marker = tmp_path / "the_payload_ran"
    folder = pickle_only_copy(bin_folder, tmp_path)
    payload = pickle.dumps({"language_model.lm_head.weight": RunsACommand(f"touch {marker}")}, protocol=protocol)
    torch_zip(folder / "pytorch_model.bin", payload)
    assert_clean_failure(score(folder, tmp_path, check=False), folder / "pytorch_model.bin",
                         "refusing to load: the pickle calls posix.system, which is not a tensor; "
                         "only torch tensors are read (convert the checkpoint to safetensors")
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: unpickled by python, it runs
    assert marker.exists()


def test_a_compressed_storage_is_refused(bin_folder, tmp_path):
    folder = pickle_only_copy(bin_folder, tmp_path)
    tensors = {}
    for shard in bin_folder.glob("*.bin"):
        tensors.update(torch.load(shard, weights_only=True))
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin") as z:
        entries = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    assert_clean_failure(score(folder, tmp_path, check=False), folder / "pytorch_model.bin", "is compressed",
                         "save it again with torch.save")


def test_a_truncated_shard_is_named(bin_folder, tmp_path):
    folder = shutil.copytree(bin_folder, tmp_path / "model")
    shard = folder / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_clean_failure(score(folder, tmp_path, check=False), f"{shard}: not a zip archive",
                         "truncated or corrupt", "download the file again")


def test_an_index_naming_a_missing_shard_is_named(bin_folder, tmp_path):
    folder = shutil.copytree(bin_folder, tmp_path / "model")
    shard = folder / "pytorch_model-00001-of-00002.bin"
    shard.unlink()
    assert_clean_failure(score(folder, tmp_path, check=False),
                         f"{folder / 'pytorch_model.bin.index.json'} names the shard {shard}, which is not there",
                         "download the missing shard again")

