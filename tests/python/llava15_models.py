"""Small random LLaVA-1.5 models as llava-hf ships llava-hf/llava-1.5-7b-hf: `LlavaForConditionalGeneration` on a
Llama decoder with vocabulary 32064 (`<image>` 32000, `<pad>` 32001), a 336/14 CLIP tower, feature layer -2 without
CLS, a gelu projector, and `LlavaProcessor` with `CLIPImageProcessor` (shortest edge 336, centre crop 336).

The builders run in both virtual environments: imported by the tests (transformers 4.57), and as
`python llava15_models.py JOBS.json` in .venv-tf5 (transformers 5), where each job is
- {"build": SEED, "out": DIR, "adapter": DIR or null}: a model saved by transformers 5 with its processor and, with
  "adapter", test_dpo's PEFT adapter on it saved by PEFT;
- {"reference": DIR, "image": PATH, "text": TEXT, "adapter": DIR or null, "out": FILE}: the processor's input_ids and
  pixel_values (PIL backend) and transformers 5's logits, with PEFT's adapter on it when given.
"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=4096, rms_norm_eps=1e-5)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2)
# llava-hf/llava-1.5-7b-hf's conversation format
PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"


def build_model(seed=0):
    config = LlavaConfig(
        text_config=LlamaConfig(vocab_size=32064, pad_token_id=32001, **TEXT),
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **VISION),
        image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", pad_token_id=32001)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    tiny_models.randomise_norms_and_biases(model)
    return model


def processor():
    # the slow (PIL) class, as llava-hf's files load in transformers 4.57
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         do_center_crop=True, resample=3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tiny_models.tokenizer(), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def save(model, out):
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    processor().save_pretrained(out)
    return out


def _tf5_jobs(jobs):
    from peft import PeftModel
    from safetensors.torch import save_file
    from test_dpo import peft_adapter
    from transformers import AutoProcessor
    for job in jobs:
        if "build" in job:
            model = build_model(job["build"])
            save(model, job["out"])
            if job.get("adapter"):
                peft_adapter(model, job["adapter"], seed=job["build"] + 1)
            continue
        inputs = AutoProcessor.from_pretrained(job["reference"], backend="pil")(
            images=Image.open(job["image"]), text=job["text"], return_tensors="pt")
        model = LlavaForConditionalGeneration.from_pretrained(job["reference"], dtype=torch.float32).eval()
        if job.get("adapter"):
            model = PeftModel.from_pretrained(model, job["adapter"]).eval()
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=inputs["pixel_values"]).logits[0]
        save_file({"logits": logits.contiguous(), "input_ids": inputs["input_ids"][0].contiguous(),
                   "pixel_values": inputs["pixel_values"][0].contiguous()}, job["out"])


if __name__ == "__main__":
    _tf5_jobs(json.loads(Path(sys.argv[1]).read_text()))
