"""Bad input ends with a clear message and exit code 2: never a panic, a hang or a traceback."""
import json
import shutil
import struct
import zlib

import pytest
from safetensors.torch import load_file, save_file

from conftest import IMAGES, run_stic

PROMPT = ["--prompt", "Describe the image."]


def assert_clean_failure(proc, *needles):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "panicked" not in proc.stderr and "RUST_BACKTRACE" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in: {proc.stderr}"


@pytest.fixture
def model_copy(hf_models, tmp_path):
    _, folder = hf_models["gqa"]
    return shutil.copytree(folder, tmp_path / "model")


def generate(model, image=IMAGES / "chelsea.png", *extra):
    return run_stic("generate", "--model", model, "--image", image, *(extra or PROMPT), "--max-new-tokens", "2",
                    "--device", "cpu", check=False, timeout=120)


def test_missing_model_folder(tmp_path):
    assert_clean_failure(generate(tmp_path / "nowhere"), "nowhere")


def test_missing_safetensors(model_copy):
    (model_copy / "model.safetensors").unlink()
    assert_clean_failure(generate(model_copy), "no model.safetensors")


def test_truncated_safetensors(model_copy):
    path = model_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_clean_failure(generate(model_copy), "model.safetensors", "truncated")


def test_missing_tensors_are_named(model_copy):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    del tensors["image_newline"]
    save_file(tensors, path, metadata={"format": "pt"})
    assert_clean_failure(generate(model_copy), "missing tensor language_model.model.layers.1.mlp.up_proj.weight",
                         "missing tensor image_newline")


def test_shape_mismatch(model_copy):
    path = model_copy / "model.safetensors"
    tensors = load_file(path)
    tensors["multi_modal_projector.linear_2.weight"] = tensors["multi_modal_projector.linear_2.weight"][:, :3].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    assert_clean_failure(generate(model_copy), "multi_modal_projector.linear_2.weight: shape")


def test_unknown_model_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(generate(model_copy), "unknown model_type 'qwen2_vl'")


def test_unreadable_and_empty_images(model_copy, tmp_path):
    bogus = tmp_path / "bogus.png"
    bogus.write_text("this is not an image")
    assert_clean_failure(generate(model_copy, bogus), "bogus.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert_clean_failure(generate(model_copy, empty), "empty.jpg")
    assert_clean_failure(generate(model_copy, tmp_path / "absent.png"), "absent.png")


def png_bytes(width, height, rows):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused(model_copy, tmp_path):
    bomb = tmp_path / "bomb.png"
    side = 20000  # 400 megapixels of zeros, a few hundred kilobytes on disk
    bomb.write_bytes(png_bytes(side, side, bytes(side + 1) * 64))
    proc = generate(model_copy, bomb)
    assert_clean_failure(proc, "bomb.png")
    assert "pixel" in proc.stderr.lower()


def test_prompt_longer_than_context(model_copy):
    long_text = "[INST] <image>\n" + "lorem ipsum " * 4000 + "[/INST]"
    assert_clean_failure(generate(model_copy, IMAGES / "chelsea.png", "--text", long_text), "context")


def test_missing_image_token_in_raw_text(model_copy):
    assert_clean_failure(generate(model_copy, IMAGES / "chelsea.png", "--text", "[INST] no image here [/INST]"),
                         "<image>")


def test_bad_dtype_and_device(model_copy):
    assert_clean_failure(generate(model_copy, IMAGES / "chelsea.png", *PROMPT, "--dtype", "int3"), "int3")
