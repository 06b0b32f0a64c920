import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

ROOT = tiny_models.ROOT
STIC = Path(os.environ.get("STIC_BIN", ROOT / "target" / "release" / "stic"))
IMAGES = ROOT / "data" / "images"
# where stic runs in the parity checks (the transformers reference stays on the CPU in f32): cpu, or cuda on a GPU
DEVICE = os.environ.get("STIC_TEST_DEVICE", "cpu")


def run_stic(*args, check=True, timeout=600):
    proc = subprocess.run([str(STIC), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stic {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_stic_json(*args):
    return [json.loads(line) for line in run_stic(*args).stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """variant -> (transformers model, folder in llava-hf layout)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for variant in tiny_models.VARIANTS:
        model = tiny_models.build_model(variant, seed=len(out))
        out[variant] = (model, tiny_models.save_hf(model, root / variant))
    return out


def official_pref_to_sft(pairs):
    """What the official `scripts/convert_pref_to_sft.py` (yihedeng9/STIC 993734e) writes for a list of pairs."""
    return [{"image": p["image"], "id": p["image"].replace("COCO_train2014_", "").replace(".jpg", ""),
             "conversations": [{"from": "human", "value": p["chosen"][0]["content"]},
                               {"from": "gpt", "value": p["chosen"][1]["content"]}]} for p in pairs]
