"""`stic image-distribution` (the paper's Fig. 7) against its references on a tiny model and COCO-sized JPEGs: the
pooled features equal transformers' `CLIPVisionModel` `pooler_output` through the CLIP image processor, the
embedding equals scikit-learn's exact `TSNE` from the same initial embedding, the plot decodes, and bad input
exits 2. A benchmark's set is the distinct images of its items as its loader gives them (files, or MMBench's
embedded images)."""
import base64
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.manifold import TSNE, _t_sne, trustworthiness
from sklearn.metrics import pairwise_distances
from transformers import CLIPImageProcessor

import eval_data
import tiny_models
from conftest import IMAGES, run_stic
from test_errors import assert_clean_failure

SOURCES = ["rocket.jpg", "waterview.jpg", "extreme_ironing.jpg", "chelsea.png", "coffee.png", "astronaut.png"]
COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375)]  # (width, height)
PERPLEXITY = 10


def coco_jpegs(folder, sources, count):
    """`count` JPEGs of COCO's sizes cut from `sources` (crops at several offsets, mirrored every other one)."""
    folder.mkdir(parents=True)
    for k in range(count):
        image = Image.open(IMAGES / sources[k % len(sources)]).convert("RGB")
        width, height = COCO_SIZES[k % len(COCO_SIZES)]
        scale = max(width / image.width, height / image.height) * (1 + 0.1 * (k % 3))
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        left, top = (image.width - width) * (k % 4) // 3, (image.height - height) * (k % 2)
        image = image.crop((left, top, left + width, top + height))
        if k % 2:
            image = ImageOps.mirror(image)
        image.save(folder / f"COCO_train2014_{k:012}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_distribution")
    model = tiny_models.build_model("gqa", seed=7)
    folder = tiny_models.save_hf(model, root / "model")
    stage1 = coco_jpegs(root / "stage1", SOURCES[:3], 40)
    bench = coco_jpegs(root / "bench", SOURCES[3:], 30)
    listed = sorted(p.name for p in bench.iterdir())[:24]
    (root / "bench.json").write_text(json.dumps(listed))
    out = root / "out"
    proc = run_stic("image-distribution", "--model", folder, "--set", f"stage1={stage1}",
                    "--set", f"bench={root / 'bench.json'}", "--image-dir", bench, "--per-set", "36",
                    "--seed", "3", "--perplexity", PERPLEXITY, "--batch-size", "5", "--device", "cpu",
                    "--dtype", "f32", "--output", out)
    return dict(root=root, model=model, folder=folder, stage1=stage1, bench=bench, listed=listed, out=out,
                stderr=proc.stderr)


def read_points(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, np.array([[float(r["x"]), float(r["y"])] for r in rows])


def test_the_sets_are_seeded_draws_and_the_features_are_clips_pooler_output(setup):
    rows, _ = read_points(setup["out"] / "embedding.csv")
    stage1 = [r["image"] for r in rows if r["set"] == "stage1"]
    bench = [r["image"] for r in rows if r["set"] == "bench"]
    assert len(stage1) == 36 and len(set(stage1)) == 36 and len(bench) == 24 and sorted(bench) == setup["listed"]
    summary = json.loads((setup["out"] / "summary.json").read_text())
    assert [(s["name"], s["images"], s["pool"]) for s in summary["sets"]] == [("stage1", 36, 40), ("bench", 24, 24)]

    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    paths = [setup["stage1"] / name for name in stage1] + [setup["bench"] / name for name in bench]
    pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = setup["model"].vision_tower(pixels).pooler_output.numpy()
    features = np.load(setup["out"] / "features.npy")
    assert features.dtype == np.float32 and features.shape == expected.shape
    np.testing.assert_allclose(features, expected, atol=2e-5, rtol=1e-4)


def test_the_embedding_is_sklearns_exact_tsne_from_the_same_init(setup):
    """t-SNE's steps amplify rounding (a change in the last bit of one gradient moves the points by their own
    scale within a few dozen exaggerated steps), so two implementations agree on the objective, not on the
    coordinates: stic's P and KL divergence are scikit-learn's, and from the same initial embedding both runs
    reach as good a minimum, with the same neighbourhoods kept."""
    features = np.load(setup["out"] / "features.npy")
    _, init = read_points(setup["out"] / "init.csv")
    _, embedding = read_points(setup["out"] / "embedding.csv")
    summary = json.loads((setup["out"] / "summary.json").read_text())
    assert abs(init[:, 0].std() - 1e-4) < 1e-12
    tsne = TSNE(n_components=2, method="exact", init=init, perplexity=PERPLEXITY, random_state=0)
    expected = tsne.fit_transform(features)
    assert summary["learning_rate"] == tsne.learning_rate_ and summary["iterations"] <= 1000

    # sklearn's P and objective at stic's last points: the KL stic reports is that of the points before its
    # last step, as sklearn reports it
    joint = _t_sne._joint_probabilities(pairwise_distances(features, squared=True), PERPLEXITY, 0)
    kl_at_end = _t_sne._kl_divergence(embedding.ravel().copy(), joint, 1, len(features), 2)[0]
    assert summary["kl_divergence"] == pytest.approx(kl_at_end, rel=1e-3)
    assert summary["kl_divergence"] == pytest.approx(tsne.kl_divergence_, rel=0.1)
    kept = trustworthiness(features, embedding, n_neighbors=5)
    assert kept == pytest.approx(trustworthiness(features, expected, n_neighbors=5), abs=0.02)


def test_the_plot_decodes(setup):
    image = Image.open(setup["out"] / "image_distribution.png")
    image.load()
    assert image.size == (900, 800)
    assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    assert "image_distribution.png" in setup["stderr"]


def test_bad_input_exits_2(setup, tmp_path):
    root = setup["root"]
    base = ["image-distribution", "--model", setup["folder"], "--device", "cpu", "--output", tmp_path / "out"]
    missing = tmp_path / "missing.txt"
    missing.write_text("\n".join(setup["listed"][:2] + ["absent_1.jpg", "absent_2.jpg"]) + "\n")
    assert_clean_failure(run_stic(*base, "--set", f"a={setup['stage1']}", "--set", f"b={missing}",
                                  "--image-dir", setup["bench"], check=False),
                         "--set b", "2 of the 4 images", "absent_1.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(run_stic(*base, "--set", f"a={empty}", check=False), "--set a", "no images")
    assert_clean_failure(run_stic(*base, "--set", "no-equals-sign", check=False), "NAME=PATH")
    assert_clean_failure(run_stic(*base, "--set", f"a={setup['stage1']}", "--per-set", "4", "--perplexity", "4",
                                  check=False), "--perplexity 4", "(4")
    assert_clean_failure(run_stic(*base, "--set", f"a={setup['stage1']}", "--set", f"a={root / 'bench.json'}",
                                  check=False), "given twice")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(empty)


# ------------------------------------------------------------------------------------------ benchmark sets

def tsv_images(tsv):
    """The distinct images of an MMBench TSV, decoded from its base64 cells (a short cell refers to another row's
    image), with the index of the first row holding each."""
    header, *lines = Path(tsv).read_text().splitlines()
    rows = [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]
    images = {}
    for row in rows:
        if len(row["image"]) > 64:
            images.setdefault(base64.b64decode(row["image"]), row["index"])
    return images


def test_benchmark_sets_are_the_distinct_images_their_loaders_give(setup, tmp_path):
    """ScienceQA's images are files (the text-only question has none), MMBench's are embedded in its TSV (its own
    circular copy of a row refers to that row's image): each set holds each image once, a file by its path and an
    embedded image by its item's id, and an embedded image's features are CLIP's on the decoded image."""
    scienceqa = eval_data.build("scienceqa", tmp_path / "scienceqa")
    mmbench = eval_data.build("mmbench", tmp_path / "mmbench")
    out = tmp_path / "out"
    run_stic("image-distribution", "--model", setup["folder"], "--set", f"stage1={setup['stage1']}",
             "--benchmark-set", f"scienceqa={scienceqa.path}", "--benchmark-set", f"mmbench={mmbench.path}",
             "--per-set", "6", "--perplexity", "3", "--device", "cpu", "--output", out)
    rows, _ = read_points(out / "embedding.csv")
    by_set = lambda name: [r["image"] for r in rows if r["set"] == name]  # noqa: E731
    records = json.loads((scienceqa.path / "llava_test_CQM-A.json").read_text())
    expected_files = {(scienceqa.path / "images" / "test" / r["image"]).resolve() for r in records if "image" in r}
    assert len(by_set("scienceqa")) == len(expected_files) == 3
    assert {Path(p).resolve() for p in by_set("scienceqa")} == expected_files
    embedded = tsv_images(mmbench.path / "mmbench_dev_20230712.tsv")
    assert len(embedded) == 2 and sorted(by_set("mmbench")) == sorted(embedded.values())
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["images"], s["pool"]) for s in summary["sets"]] == [
        ("stage1", 6, 40), ("scienceqa", 3, 3), ("mmbench", 2, 2)]
    assert summary["sets"][2]["path"] == str(mmbench.path)

    photo, index = next(iter(embedded.items()))
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    pixels = processor([Image.open(io.BytesIO(photo)).convert("RGB")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = setup["model"].vision_tower(pixels).pooler_output.numpy()
    row = next(k for k, r in enumerate(rows) if r["set"] == "mmbench" and r["image"] == index)
    np.testing.assert_allclose(np.load(out / "features.npy")[row:row + 1], expected, atol=2e-5, rtol=1e-4)


def test_bad_benchmark_sets_exit_2(setup, tmp_path):
    base = ["image-distribution", "--model", setup["folder"], "--device", "cpu", "--output", tmp_path / "out"]
    scienceqa = eval_data.build("scienceqa", tmp_path / "scienceqa")
    assert_clean_failure(run_stic(*base, "--benchmark-set", f"nonesuch={scienceqa.path}", check=False),
                         "--benchmark-set nonesuch", "unknown benchmark", "scienceqa, textvqa")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(run_stic(*base, "--benchmark-set", f"mmbench={empty}", check=False),
                         "--benchmark-set mmbench", f"missing {empty / 'mmbench_dev_20230712.tsv'}")
    text_only = tmp_path / "text_only"
    (text_only / "images" / "test").mkdir(parents=True)
    records = json.loads((scienceqa.path / "llava_test_CQM-A.json").read_text())
    (text_only / "llava_test_CQM-A.json").write_text(json.dumps([r for r in records if "image" not in r]))
    assert_clean_failure(run_stic(*base, "--benchmark-set", f"scienceqa={text_only}", check=False),
                         "--benchmark-set scienceqa", f"no item of {text_only} has an image")
    assert_clean_failure(run_stic(*base, "--set", f"scienceqa={setup['stage1']}",
                                  "--benchmark-set", f"scienceqa={scienceqa.path}", check=False), "given twice")
    assert_clean_failure(run_stic(*base, "--benchmark-set", "scienceqa", check=False), "NAME=DATA_DIR")
    assert not (tmp_path / "out").exists()
