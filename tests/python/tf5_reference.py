"""The transformers 5 / PEFT 0.21 side of test_transformers5.py, run in .venv-tf5 (the test process runs transformers
4.57). `python tf5_reference.py JOBS.json` runs the jobs of the file in order:

- {"build": VARIANT, "seed": S, "out": DIR, "image_mean": [...], "image_std": [...], "adapter": DIR}: a tiny
  LLaVA-NeXT (a tiny_models variant, Mistral or Llama) built from its config and saved by transformers 5 with its
  processor, as a user of transformers 5 makes one today; with "adapter", test_dpo's PEFT adapter on it (non-zero B, trained projector),
  saved by PEFT 0.21.
- {"reference": DIR, "image": PATH, "text": TEXT, "adapter": DIR or null, "input_ids": FILE or null, "out": FILE}:
  the processor's input_ids, pixel_values and image_sizes (PIL backend: the one whose pixels match transformers 4 and
  stic) and the logits of the saved model, with PEFT's adapter on it when given; with "input_ids" (a safetensors file
  of stic's), those ids instead of the processor's.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402
from test_dpo import peft_adapter  # noqa: E402

assert transformers.__version__.startswith("5."), transformers.__version__


def build(job):
    model = tiny_models.build_model(job["build"], seed=job["seed"])
    out = Path(job["out"])
    model.save_pretrained(out)
    image_processor = LlavaNextImageProcessor(  # transformers 5's default class (the torchvision backend)
        image_grid_pinpoints=tiny_models.PINPOINTS, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=job["image_mean"], image_std=job["image_std"])
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_models.tokenizer(), patch_size=14,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(out)
    if job.get("adapter"):
        peft_adapter(model, job["adapter"], seed=job["seed"] + 1)


def reference(job):
    folder = job["reference"]
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    inputs = processor(images=Image.open(job["image"]), text=job["text"], return_tensors="pt")
    if job.get("input_ids"):
        inputs["input_ids"] = load_file(job["input_ids"])["input_ids"][None]
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    if job.get("adapter"):
        model = PeftModel.from_pretrained(model, job["adapter"]).eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[0]
    save_file({"logits": logits.contiguous(), "input_ids": inputs["input_ids"][0].contiguous(),
               "pixel_values": inputs["pixel_values"][0].contiguous(), "image_size": inputs["image_sizes"][0].contiguous()},
              job["out"])


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        build(job) if "build" in job else reference(job)
