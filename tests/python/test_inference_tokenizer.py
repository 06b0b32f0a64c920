"""Which tokenizer LLaVA's inference uses on a Mistral checkpoint, and whether it matters for the ids.

LLaVA's builder (`llava.model.builder.load_pretrained_model`) loads a "mistral" checkpoint without a model base
with `AutoTokenizer.from_pretrained(model_path)`: the FAST tokenizer, converted from `tokenizer.model` since
liuhaotian/llava-v1.6-mistral-7b ships no `tokenizer.json`. Every other LLaVA checkpoint (Vicuna/Llama, LoRA with a
base), and training (`llava/train/train.py`), load the slow one (`use_fast=False`), which `stic --processing llava`
implements everywhere.

Measured on the real Mistral-7B tokenizer, in the folder layout LLaVA saves (`tiny_models.llava_tokenizer`), with
`tokenizer_image_token` on `llava.conversation`'s prompts, each prompt classed as test_tokenizer.py classes texts
(identical / special_token_text / unexplained): every prompt of every inference step is "identical".

  step (template)                                                    prompts  differ
  prefs (mistral_instruct): preferred, hallucination, plain prompts       17       0
  describe (mistral_instruct)                                              8       0
  eval (vicuna_v1): each benchmark's question format                      21       0
  DaR description pass (vicuna_v1)                                         1       0
  DaR answer (vicuna_v1): 8 fed-back outputs x 21 questions              168       0

The same holds with special-token text (`</s>`, `<s>`, `<unk>`) in a fed-back output (both tokenizers split it out
alike) and on the whole test_tokenizer corpus (1,999 texts). So stic keeps the slow tokenizer at inference: its ids
equal the fast tokenizer's on all of these.

Decoding (what the generated text becomes) differs only on output that begins with the 16-space piece
"▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁" (id 359): the slow decoder leaves 15 of its "▁" unreplaced, the fast one gives spaces, which
LLaVA's `.strip()` removes; see test_decoding_after_llavas_strip_differs_only_on_a_leading_16_space_piece.
"""
import inspect
import json
import re
import subprocess
from collections import Counter

import eval_data
import pytest
import test_tokenizer
import tiny_models
from conftest import STIC

PROMPTS = json.loads((tiny_models.ROOT / "third_party" / "stic" / "prompts.json").read_text())
SPECIAL_TEXT = re.compile(r"<s>|</s>|<unk>")
SIXTEEN_SPACES_ID = 359

# Realistic model outputs as DaR feeds them back: whitespace runs, leading spaces and newlines, lists, unicode,
# and special-token text (which generated text loses when decoded with skip_special_tokens, but a description file
# may hold).
FED_BACK_OUTPUTS = [
    "The image shows a man ironing clothes on the back of a yellow taxi in a busy city street.",
    "  The image shows  a cat sitting on a mat.\n\nIt is sunny. ",
    "\nA dog runs across the grass.",
    " In the foreground, there are:\n1. A red car\n2. Two  pedestrians\n\n",
    "The sign reads \"CAFÉ – open 24/7\"; the sky is overcast…\t(photo taken at dusk)",
    "A chart titled 'Sales 2019–2021' with bars of 12.5%,  30% and 57.5%.\n",
    "The answer is B.</s>",
    "x <s> y <unk> z",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tokenizer files as LLaVA saves them beside a Mistral checkpoint (no tokenizer.json)."""
    path = tmp_path_factory.mktemp("llava-v1.6-mistral-7b")
    tiny_models.llava_tokenizer().save_pretrained(path)
    assert not (path / "tokenizer.json").exists()
    return path


@pytest.fixture(scope="module")
def tokenizers(folder):
    from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast
    slow, fast = AutoTokenizer.from_pretrained(folder, use_fast=False), AutoTokenizer.from_pretrained(folder)
    assert type(slow) is LlamaTokenizer and type(fast) is LlamaTokenizerFast
    return slow, fast


def prompt(template, question):
    from llava.conversation import conv_templates
    conv = conv_templates[template].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.fixture(scope="module")
def eval_questions(tmp_path_factory):
    return [q for name, build in eval_data.BUILDERS.items()
            for q in build(tmp_path_factory.mktemp(name)).prompts.values()]


@pytest.fixture(scope="module")
def steps(eval_questions):
    """The prompts of every inference step, rendered as the official scripts render them."""
    stage1 = [PROMPTS["preferred_prompt"], *PROMPTS["hallucination_prompts"], *PROMPTS["description_prompts"]]
    infused = [PROMPTS["description_infusion_format"].format(description=output, question=question)
               for output in FED_BACK_OUTPUTS for question in eval_questions]
    return {
        "prefs": [prompt("mistral_instruct", q) for q in stage1],
        "describe": [prompt("mistral_instruct", q) for q in PROMPTS["description_prompts"]],
        "eval": [prompt("vicuna_v1", q) for q in eval_questions],
        "dar_description": [prompt("vicuna_v1", PROMPTS["dar_description_prompt"])],
        "dar_answer": [prompt("vicuna_v1", q) for q in infused],
    }


def difference_class(text, slow_ids, fast_ids):
    if slow_ids == fast_ids:
        return "identical"
    return "special_token_text" if SPECIAL_TEXT.search(text) else "unexplained"


def llava_ids(tokenizer, texts):
    from llava.mm_utils import tokenizer_image_token
    return [tokenizer_image_token(t, tokenizer) for t in texts]


def test_llavas_builder_loads_the_fast_tokenizer_for_mistral_only():
    from llava.model.builder import load_pretrained_model
    source = inspect.getsource(load_pretrained_model)
    mistral_branch = ("elif 'mistral' in model_name.lower():\n"
                      "                tokenizer = AutoTokenizer.from_pretrained(model_path)\n")
    assert source.count(mistral_branch) == 1
    assert source.count("AutoTokenizer.from_pretrained(model_path)\n") == 1  # no other default (fast) load
    assert source.count("use_fast=False") == 5  # LoRA, model base, llava_llama, and the non-LLaVA models


def test_fast_and_slow_ids_agree_on_every_inference_step(tokenizers, steps):
    slow, fast = tokenizers
    counts = {}
    for step, texts in steps.items():
        counts[step] = Counter(difference_class(t, s, f)
                               for t, s, f in zip(texts, llava_ids(slow, texts), llava_ids(fast, texts)))
    assert counts == {"prefs": {"identical": 17}, "describe": {"identical": 8}, "eval": {"identical": 21},
                      "dar_description": {"identical": 1}, "dar_answer": {"identical": 168}}
    # the special-token text of the fed-back outputs is covered, and still identical
    assert sum(bool(SPECIAL_TEXT.search(t)) for t in steps["dar_answer"]) == 2 * 21


def test_fast_and_slow_ids_agree_on_the_tokenizer_corpus(tokenizers):
    slow, fast = tokenizers
    corpus = test_tokenizer.CORPUS
    assert llava_ids(slow, corpus) == llava_ids(fast, corpus)
    assert sum(bool(SPECIAL_TEXT.search(t)) for t in corpus) >= 100


def test_stic_ids_are_llavas_inference_ids(folder, tokenizers, steps):
    _, fast = tokenizers
    texts = [t for step_texts in steps.values() for t in step_texts]
    lines = "".join(json.dumps(t) + "\n" for t in texts)
    proc = subprocess.run([str(STIC), "tokenize", "--model", str(folder), "--processing", "llava"], input=lines,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == llava_ids(fast, texts)


def test_decoding_after_llavas_strip_differs_only_on_a_leading_16_space_piece(tokenizers):
    slow, fast = tokenizers
    sequences = [slow(t, add_special_tokens=False).input_ids for t in test_tokenizer.CORPUS]
    sequences += [[slow.bos_token_id, *ids, slow.eos_token_id] for ids in sequences]
    def as_llava_writes_it(tokenizer, ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    differ = [ids for ids in sequences if as_llava_writes_it(slow, ids) != as_llava_writes_it(fast, ids)]
    first_text_tokens = [[i for i in ids if i not in slow.all_special_ids][0] for ids in differ]
    assert differ and set(first_text_tokens) == {SIXTEEN_SPACES_ID}
