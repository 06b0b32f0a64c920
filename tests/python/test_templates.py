"""The conversation templates, string for string against LLaVA's `llava.conversation`, and the template that
`stic prefs` and `stic describe` pick by the model's name (the official `generate_pref.py` rule)."""
import json
import shutil
import subprocess

import pytest
from conftest import IMAGES, STIC, run_stic

TEMPLATES = ["mistral_instruct", "vicuna_v1", "llava_v1", "chatml_direct"]
QUESTION, ANSWER = "What is in the picture?", "A cat on a mat."
FOLLOW_UP, SECOND_ANSWER = "What colour is the cat?", "Grey."


def conversations():
    """(name, messages, image): a prompt for generation (assistant turn open) and training texts with answers,
    with and without an image, one and two turns (the image in the first user turn, as STIC's scripts put it)."""
    for image in [True, False]:
        first = ("<image>\n" + QUESTION) if image else QUESTION
        yield "generation", [first, None], image
        yield "one turn", [first, ANSWER], image
        yield "two turns", [first, ANSWER, FOLLOW_UP, SECOND_ANSWER], image
        yield "two turns, open", [first, ANSWER, FOLLOW_UP, None], image


def rendered(template, conversations):
    lines = "".join(json.dumps(messages) + "\n" for messages in conversations)
    proc = subprocess.run([str(STIC), "render-template", "--template", template], input=lines, capture_output=True,
                          text=True, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_render_as_llava_conversation_py(template):
    from llava.conversation import conv_templates
    cases = list(conversations())
    ours = rendered(template, [messages for _, messages, _ in cases])
    for (name, messages, image), text in zip(cases, ours):
        conv = conv_templates[template].copy()
        for i, message in enumerate(messages):
            conv.append_message(conv.roles[i % 2], message)
        assert text == conv.get_prompt(), (template, name, image)
        if image:
            # the web demo's form: the first user turn as (text, image, mode), `<image>` put in front by get_prompt
            demo = conv_templates[template].copy()
            for i, message in enumerate(messages):
                demo.append_message(demo.roles[i % 2], (QUESTION, None, "Default") if i == 0 else message)
            assert text == demo.get_prompt(), (template, name, "tuple")


def test_the_new_templates_are_llavas():
    from llava.conversation import conv_templates
    assert conv_templates["llava_v1"].version == "v1" and "curious human" in conv_templates["llava_v1"].system
    assert conv_templates["chatml_direct"].version == "mpt"
    assert conv_templates["chatml_direct"].system == "<|im_start|>system\nAnswer the questions."


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    run_stic("init-tiny", "--output", root / "model", timeout=120)
    return root


def named(root, name):
    """The tiny model under another folder name (the official rule reads the template from it)."""
    folder = root / name
    if not folder.exists():
        shutil.copytree(root / "model", folder)
    return folder


GEN = ["--limit", "1", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "f32"]


def recorded_template(output):
    return json.loads(output.with_name(output.name + ".settings.json").read_text())["template"]


@pytest.mark.parametrize("name,template", [
    ("llava-v1.5-7b", "llava_v1"),
    ("llava-v1.6-mistral-7b", "mistral_instruct"),
    ("llava-v1.6-34b", "chatml_direct"),
])
def test_prefs_picks_the_template_by_the_model_name(tiny_root, tmp_path, name, template):
    out = tmp_path / "prefs.jsonl"
    run_stic("prefs", "--model", named(tiny_root, name), "--image-dir", IMAGES, "--output", out, *GEN)
    assert recorded_template(out) == template


def test_prefs_and_describe_take_template(tiny_root, tmp_path):
    model = named(tiny_root, "llava-v1.6-mistral-7b")
    out = tmp_path / "prefs.jsonl"
    run_stic("prefs", "--model", model, "--image-dir", IMAGES, "--output", out, "--template", "llava_v1", *GEN)
    assert recorded_template(out) == "llava_v1"
    # a rerun with another template into the same output is refused: the template is part of the records' settings
    proc = run_stic("prefs", "--model", model, "--image-dir", IMAGES, "--output", out, *GEN, check=False)
    assert proc.returncode == 2 and "template" in proc.stderr, proc.stderr

    data = tmp_path / "data.json"
    image = sorted(p.name for p in IMAGES.iterdir() if p.suffix == ".jpg")[0]
    data.write_text(json.dumps([{"id": "a", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A thing."}]}]))
    for args, expected in [([], "llava_v1"), (["--template", "chatml_direct"], "chatml_direct")]:
        desc = tmp_path / f"describe-{expected}.jsonl"
        run_stic("describe", "--model", named(tiny_root, "llava-v1.5-7b"), "--data", data, "--image-dir", IMAGES,
                 "--output", desc, *args, *GEN)
        assert recorded_template(desc) == expected


def test_a_name_with_a_template_stic_lacks_is_refused(tiny_root, tmp_path):
    proc = run_stic("prefs", "--model", named(tiny_root, "llava-llama-2-13b-chat"), "--image-dir", IMAGES,
                    "--output", tmp_path / "p.jsonl", *GEN, check=False)
    assert proc.returncode == 2 and "llava_llama_2" in proc.stderr and "--template" in proc.stderr, proc.stderr
    assert not (tmp_path / "p.jsonl").exists()
