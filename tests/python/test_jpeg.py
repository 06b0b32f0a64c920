"""stic's JPEG decoding against `PIL.Image.open(path).convert("RGB")` (Pillow's libjpeg-turbo): the same pixels
(max diff 0) on the repository's photos and on JPEGs of every kind the data sets hold, written here by Pillow;
the same refusal of truncated files; and the same `pixel_values` as LlavaNextImageProcessor."""
import io
import os
import struct
import subprocess

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaNextImageProcessor

from conftest import IMAGES, STIC, run_stic

REPO_JPEGS = sorted(p.name for p in IMAGES.glob("*.jpg"))
COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (300, 200)]  # (width, height)


def photo(name, size, mode="RGB"):
    return Image.open(IMAGES / name).convert(mode).resize(size, Image.Resampling.BICUBIC)


def save(image, **options):
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


def with_adobe_transform(jpeg, transform):
    """The same file with the Adobe APP14 colour transform flag changed (0: none, 1: YCbCr, 2: YCCK)."""
    at = jpeg.index(b"\xff\xee")
    assert jpeg[at + 4:at + 9] == b"Adobe"
    return jpeg[:at + 15] + bytes([transform]) + jpeg[at + 16:]


def exif_with_thumbnail(thumbnail):
    """An EXIF block whose IFD1 holds a JPEG thumbnail (complete with its own SOI/EOI markers), as cameras write."""
    ifd0 = struct.pack("<H", 0) + struct.pack("<I", 14)  # no entries; IFD1 follows at offset 14
    ifd1_entries = [(0x0201, 4, 1, 8 + len(ifd0) + 2 + 2 * 12 + 4), (0x0202, 4, 1, len(thumbnail))]
    ifd1 = struct.pack("<H", len(ifd1_entries)) + b"".join(struct.pack("<HHII", *e) for e in ifd1_entries)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0 + ifd1 + struct.pack("<I", 0) + thumbnail


def scan_starts(jpeg):
    """Offsets of the start-of-scan markers after the header (entropy-coded data never holds 0xFF 0xDA)."""
    return [i for i in range(jpeg.index(b"\xff\xda"), len(jpeg) - 1) if jpeg[i:i + 2] == b"\xff\xda"]


def corrupt_entropy_data(jpeg):
    """Flips bits in the middle of the first scan (never making a 0xFF, so no marker appears): libjpeg warns and
    goes on, and Pillow ignores its warnings."""
    data = bytearray(jpeg)
    start = scan_starts(jpeg)[0] + 100
    for i in range(start, start + 400, 37):
        if data[i] != 0xFF and data[i - 1] != 0xFF:
            data[i] = (data[i] ^ 0x5A) if (data[i] ^ 0x5A) != 0xFF else data[i] ^ 0x01
    return bytes(data)


def generated():
    """name -> JPEG bytes written by Pillow 13 (libjpeg-turbo 3.2.0)."""
    cases = {}
    for (w, h), source in zip(COCO_SIZES, ["coffee.png", "astronaut.png", "chelsea.png", "coffee.png", "logo.png"]):
        cases[f"baseline_420_q75_{w}x{h}"] = save(photo(source, (w, h)), quality=75)
    cases["baseline_420_q95"] = save(photo("chelsea.png", (640, 427)), quality=95, subsampling="4:2:0")
    cases["baseline_444_q90"] = save(photo("coffee.png", (640, 480)), quality=90, subsampling="4:4:4")
    cases["baseline_422"] = save(photo("astronaut.png", (500, 375)), quality=85, subsampling="4:2:2")
    cases["optimized_huffman"] = save(photo("coffee.png", (640, 427)), quality=80, optimize=True)
    cases["q100_444"] = save(photo("chelsea.png", (300, 200)), quality=100, subsampling=0)
    cases["progressive_420"] = save(photo("astronaut.png", (480, 640)), quality=85, progressive=True)
    cases["progressive_444"] = save(photo("coffee.png", (500, 375)), quality=90, progressive=True, subsampling=0)
    cases["grayscale"] = save(photo("camera.png", (640, 480), "L"), quality=85)
    cases["grayscale_progressive"] = save(photo("camera.png", (500, 375), "L"), quality=75, progressive=True)
    cmyk = save(photo("coffee.png", (640, 427), "CMYK"), quality=90)  # Adobe marker, inverted CMYK
    cases["cmyk_adobe"] = cmyk
    cases["cmyk_progressive"] = save(photo("chelsea.png", (300, 200), "CMYK"), quality=85, progressive=True)
    cases["ycck"] = with_adobe_transform(cmyk, 2)
    cases["rgb_adobe_no_transform"] = save(photo("chelsea.png", (500, 375)), quality=90, keep_rgb=True)
    cases["restart_every_block"] = save(photo("coffee.png", (640, 480)), quality=85, restart_marker_blocks=1)
    cases["restart_every_2_rows"] = save(photo("astronaut.png", (640, 427)), quality=85, restart_marker_rows=2)
    thumbnail = save(photo("chelsea.png", (160, 120)), quality=70)
    cases["exif_thumbnail"] = save(photo("chelsea.png", (640, 427)), quality=90,
                                   exif=exif_with_thumbnail(thumbnail))
    cases["odd_size_1x1"] = save(photo("coffee.png", (1, 1)))
    cases["odd_size_7x333"] = save(photo("coffee.png", (7, 333)), quality=90)
    cases["corrupt_entropy_data"] = corrupt_entropy_data(cases["baseline_420_q75_640x480"])
    # A progressive file whose last scans are missing but which ends properly: libjpeg's block smoothing fills in
    # the coefficients that were not sent, and Pillow decodes it without complaint.
    progressive = cases["progressive_420"]
    cases["progressive_first_scans_only"] = progressive[:scan_starts(progressive)[3]] + b"\xff\xd9"
    return cases


GENERATED = generated()


def pillow_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def write(folder, name, data):
    path = folder / f"{name}.jpg"
    path.write_bytes(data)
    return path


def decode_with_stic(paths, folder, env=None):
    """One stic run for all the files (its start-up, libtorch's loading, is most of the time)."""
    subprocess.run([str(STIC), "decode-image", *(a for p in paths for a in ("--image", str(p))),
                    "--output-dir", str(folder)],
                   check=True, capture_output=True, env=None if env is None else {**os.environ, **env})
    return {p.name: np.asarray(Image.open(folder / f"{p.stem}.png")) for p in paths}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    return [IMAGES / name for name in REPO_JPEGS] + [write(folder, name, data) for name, data in GENERATED.items()]


@pytest.fixture(scope="module")
def decoded(jpegs, tmp_path_factory):
    return decode_with_stic(jpegs, tmp_path_factory.mktemp("decoded"))


def assert_same_pixels(path, got):
    want = pillow_rgb(path)
    assert got.shape == want.shape
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() == 0, f"{path.name}: {np.count_nonzero(diff)} samples differ, by up to {diff.max()}"


@pytest.mark.parametrize("name", REPO_JPEGS + [f"{name}.jpg" for name in GENERATED])
def test_decoded_like_pillow(jpegs, decoded, name):
    [path] = [p for p in jpegs if p.name == name]
    assert_same_pixels(path, decoded[name])


def test_the_cases_are_what_they_say():
    """Guards the generator: each file has the layout that its name promises."""
    def opened(name):
        return Image.open(io.BytesIO(GENERATED[name]))
    assert [c[1:3] for c in opened("baseline_444_q90").layer] == [(1, 1)] * 3
    assert [c[1:3] for c in opened("baseline_422").layer][0] == (2, 1)
    assert [c[1:3] for c in opened("baseline_420_q95").layer][0] == (2, 2)
    assert opened("progressive_420").info.get("progressive") and len(scan_starts(GENERATED["progressive_420"])) > 4
    assert opened("grayscale").mode == "L"
    assert opened("cmyk_adobe").mode == "CMYK" and opened("cmyk_adobe").info["adobe_transform"] == 0
    assert opened("ycck").info["adobe_transform"] == 2
    assert opened("rgb_adobe_no_transform").info["adobe_transform"] == 0
    assert GENERATED["restart_every_block"].count(b"\xff\xd0") > 100
    assert GENERATED["exif_thumbnail"].count(b"\xff\xd8") == 2
    # the thumbnail decodes to something other than the main image, so reading it by mistake would show
    assert Image.open(io.BytesIO(GENERATED["exif_thumbnail"])).size == (640, 427)


@pytest.mark.parametrize("simd", ["JSIMD_FORCENONE", "JSIMD_FORCESSE2"])
def test_simd_and_plain_c_decode_alike(jpegs, decoded, tmp_path, simd):
    """libjpeg-turbo picks AVX2 where the CPU has it; its SSE2 and plain C code give the same samples."""
    for name, got in decode_with_stic(jpegs, tmp_path, env={simd: "1"}).items():
        assert np.array_equal(got, decoded[name]), name


def truncations():
    progressive, baseline = GENERATED["progressive_420"], GENERATED["baseline_420_q75_640x480"]
    return {
        "baseline_half": baseline[:len(baseline) // 2],
        "baseline_without_end_marker": baseline[:-2],
        "progressive_half": progressive[:len(progressive) // 2],
        "progressive_without_end_marker": progressive[:-2],
        "exif_thumbnail_half": GENERATED["exif_thumbnail"][:len(GENERATED["exif_thumbnail"]) // 2],
        "header_only": baseline[:scan_starts(baseline)[0] + 20],
    }


@pytest.mark.parametrize("name", sorted(truncations()))
def test_truncated_files_are_refused_like_pillow(tmp_path, name):
    path = write(tmp_path, name, truncations()[name])
    with pytest.raises(OSError, match="truncated"):
        pillow_rgb(path)
    proc = run_stic("decode-image", "--image", path, "--output-dir", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"image {path}: corrupt or truncated JPEG data" in proc.stderr and "truncated file" in proc.stderr
    assert not (tmp_path / "out" / f"{name}.png").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpeg") / "tiny"
    run_stic("init-tiny", "--output", folder)
    return folder


@pytest.mark.parametrize("name", ["baseline_420_q75_500x375", "cmyk_adobe", "grayscale_progressive"])
def test_pixel_values_equal_the_image_processors(tiny_model, tmp_path, name):
    """What the model sees: stic's preprocessing of the decoded pixels against LlavaNextImageProcessor's on
    Pillow's, the tiny model's processor config being llava-v1.6-mistral's (336 tiles, its pinpoints). The
    repository's JPEGs are checked so in test_parity.py, logits included."""
    path = write(tmp_path, name, GENERATED[name])
    want = LlavaNextImageProcessor.from_pretrained(tiny_model)(Image.open(path), return_tensors="pt")
    out = tmp_path / "logits.safetensors"
    run_stic("score", "--model", tiny_model, "--image", path, "--text", "[INST] <image>\nHi [/INST]",
             "--logits-out", out, "--dtype", "f32")
    got = load_file(out)["pixel_values"]
    assert got.shape == want["pixel_values"][0].shape
    assert (got - want["pixel_values"][0]).abs().max().item() == 0
