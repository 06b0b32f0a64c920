"""The switches of `stic eval` that the official profile uses (--template, --max-new-tokens, --with-text-only,
--dar-image-blind, --profile), DaR descriptions made once per image and reused across MMBench rotations and resumed
runs, and the guard that keeps an output folder to one set of settings. Tiny random model: its answers are noise."""
import json
import os
import shutil

import eval_data
from conftest import ROOT, run_stic
from test_eval import (DAR_TIMEOUT, assert_clean_failure, predictions, read_jsonl, score_json, stic_eval, tiny_model,
                       without_provenance)

__all__ = ["tiny_model"]  # the session fixture, shared with test_eval
DAR = ["--dar", "--description-max-new-tokens", "16"]


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def test_dar_descriptions_are_made_once_per_image_across_rotations_and_runs(tiny_model, tmp_path):
    bench = eval_data.mmbench(tmp_path / "data")
    out = tmp_path / "out"
    # --circular: row 0 in 3 rotations, row 1 in 4 (the file's own copy of row 0 is skipped); two images
    proc = stic_eval(tiny_model, bench, out, "--circular", *DAR, timeout=DAR_TIMEOUT)
    assert "descriptions.jsonl: 2 written, 0 already there" in proc.stderr
    assert "predictions.jsonl: 7 written" in proc.stderr
    descriptions = read_jsonl(out / "descriptions.jsonl")
    rows = read_jsonl(out / "predictions.jsonl")
    heads = {r["id"]: r["prompt"].split("\n\n", 1)[0] for r in rows}
    assert len({heads[i] for i in ("0", "1000000", "2000000")}) == 1
    assert len({heads[i] for i in ("1", "1000001", "2000001", "3000001")}) == 1
    assert {h.removeprefix("Image description:\n") for h in heads.values()} == {d["description"] for d in descriptions}

    # resumed: nothing is described or answered again
    before = (out / "descriptions.jsonl").read_bytes()
    proc = stic_eval(tiny_model, bench, out, "--circular", *DAR, timeout=DAR_TIMEOUT)
    assert "descriptions.jsonl: 0 written, 2 already there" in proc.stderr
    assert "predictions.jsonl: 0 written, 7 already there" in proc.stderr
    assert (out / "descriptions.jsonl").read_bytes() == before

    # written without the image (the official DaR): one description for every question
    blind = tmp_path / "blind"
    proc = stic_eval(tiny_model, bench, blind, "--circular", *DAR, "--dar-image-blind", timeout=DAR_TIMEOUT)
    assert "descriptions.jsonl: 1 written" in proc.stderr
    [description] = read_jsonl(blind / "descriptions.jsonl")
    assert description["image_sha256"] is None
    assert {r["prompt"].split("\n\n", 1)[0] for r in read_jsonl(blind / "predictions.jsonl")} == \
        {"Image description:\n" + description["description"]}
    assert summary_of(blind)["provenance"]["generation"]["dar"]["image_blind"] is True


def test_dar_prompt_reaches_the_descriptions_and_guards_the_folder(tiny_model, tmp_path):
    """The paper's Table 9: DaR with another description prompt (here the first hallucination prompt)."""
    bench = eval_data.mmbench(tmp_path / "data")
    out = tmp_path / "out"
    prompt = json.loads((ROOT / "third_party" / "stic" / "prompts.json").read_text())["hallucination_prompts"][0]
    stic_eval(tiny_model, bench, out, *DAR, "--dar-prompt", prompt, timeout=DAR_TIMEOUT)
    assert summary_of(out)["provenance"]["generation"]["dar"]["description_prompt"] == prompt
    proc = stic_eval(tiny_model, bench, out, *DAR, check=False, timeout=DAR_TIMEOUT)
    assert_clean_failure(proc, "holds predictions made with other settings", "description_prompt")
    for extra in [["--dar-prompt", prompt], [*DAR, "--dar-prompt", " "]]:
        proc = stic_eval(tiny_model, bench, tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2 and "--dar" in proc.stderr, proc.stderr


def test_template_profile_and_token_limit_reach_the_run_and_its_provenance(tiny_model, tmp_path):
    bench = eval_data.scienceqa(tmp_path / "data")
    mistral, vicuna = tmp_path / "mistral", tmp_path / "vicuna"
    stic_eval(tiny_model, bench, mistral)
    official = ["--template", "vicuna_v1", "--profile", "official"]
    stic_eval(tiny_model, bench, vicuna, *official)
    assert predictions(vicuna / "predictions.jsonl") != predictions(mistral / "predictions.jsonl"), \
        "another template, other greedy answers"
    provenance = summary_of(vicuna)["provenance"]
    assert (provenance["template"], provenance["profile"]) == ("vicuna_v1", "official")
    assert provenance["generation"]["max_new_tokens"] == 8

    # without --max-new-tokens a short-answer benchmark gets 128 new tokens (the official scripts allow 1024)
    proc = run_stic("eval", "--model", tiny_model, "--benchmark", "scienceqa", "--data", bench.path, "--output",
                    tmp_path / "default", "--device", "cpu", "--limit", "1", timeout=240)
    assert summary_of(tmp_path / "default")["provenance"]["generation"]["max_new_tokens"] == 128, proc.stderr

    # an output folder keeps the settings its predictions were made with
    proc = stic_eval(tiny_model, bench, vicuna, check=False)
    assert_clean_failure(proc, "holds predictions made with other settings", "template", "eval_settings.json")
    proc = stic_eval(tiny_model, bench, vicuna, "--template", "vicuna_v1", "--profile", "paper")
    assert "0 written, 3 already there" in proc.stderr, "the profile label is not a setting"

    # weights rewritten in place (a retrained adapter, a re-merged model) are other settings too
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    stic_eval(model, bench, tmp_path / "copy")
    weights = next(model.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert_clean_failure(stic_eval(model, bench, tmp_path / "copy", check=False), "model_files")

    proc = stic_eval(tiny_model, bench, tmp_path / "x", "--template", "llama_2", check=False)
    assert_clean_failure(proc, "invalid value 'llama_2' for '--template", "mistral_instruct, vicuna_v1, llava_v1, chatml_direct")
    proc = stic_eval(tiny_model, bench, tmp_path / "x", "--dar-image-blind", check=False)
    assert proc.returncode == 2 and "--dar" in proc.stderr


def test_scienceqa_text_only_questions_are_answered_on_request(tiny_model, tmp_path):
    """The official run answers every question of llava_test_CQM-A.json (the text-only one without an image) and
    prints Accuracy and IMG-Accuracy."""
    bench = eval_data.scienceqa(tmp_path / "data")
    out = tmp_path / "out"
    proc = stic_eval(tiny_model, bench, out, "--with-text-only")
    assert "4 written" in proc.stderr
    rows = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["4", "5", "7", "12"]
    text_only = next(r for r in eval_data.SCIENCEQA_RECORDS if r[0] == "5")
    assert rows[1]["prompt"] == f"{text_only[4]}\n{eval_data.ANSWER_LETTER}"
    summary = summary_of(out)
    assert summary["total"] == 4 and summary["extra"]["img_total"] == 3
    assert summary["provenance"]["benchmark"]["with_text_only"] is True
    rescored = score_json("scienceqa", out / "predictions.jsonl", bench.path, "--with-text-only")
    assert without_provenance(rescored) == without_provenance(summary)


def test_descriptions_file_gives_the_answers_of_generated_dar(tiny_model, tmp_path):
    """`--descriptions FILE`: the paper's DaR on the benchmarks other than MMBench read descriptions made
    beforehand, keyed by the image path (the commented-out code of the official model_vqa_science.py / model_vqa.py),
    into the same answer prompt as the generated DaR."""
    import hashlib
    bench = eval_data.scienceqa(tmp_path / "data")
    generated = tmp_path / "generated"
    stic_eval(tiny_model, bench, generated, *DAR, timeout=DAR_TIMEOUT)
    by_sha = {d["image_sha256"]: d["description"] for d in read_jsonl(generated / "descriptions.jsonl")}
    records = []
    for qid in bench.ids:  # the official key: the image folder joined with the file name, "./" cut
        image = bench.path / "images" / "test" / qid / "image.png"
        records.append({"image": f"playground/data/eval/scienceqa/images/test/{qid}/image.png",
                        "description": by_sha[hashlib.sha256(image.read_bytes()).hexdigest()]})
    file = tmp_path / "descriptions.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))

    from_file = tmp_path / "from_file"
    stic_eval(tiny_model, bench, from_file, "--descriptions", file)
    rows = {r["id"]: (r["prompt"], r["prediction"]) for r in read_jsonl(from_file / "predictions.jsonl")}
    assert rows == {r["id"]: (r["prompt"], r["prediction"]) for r in read_jsonl(generated / "predictions.jsonl")}
    provenance = summary_of(from_file)["provenance"]["generation"]
    assert provenance["descriptions_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert provenance["dar"] is None

    # another file into the same folder is another setting
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "description": "x"}) + "\n" for r in records))
    assert_clean_failure(stic_eval(tiny_model, bench, from_file, "--descriptions", other, check=False),
                         "holds predictions made with other settings", "descriptions_sha256")

    # a file that misses questions names how many and which
    file.write_text("".join(json.dumps(r) + "\n" for r in records[1:]))
    proc = stic_eval(tiny_model, bench, tmp_path / "x", "--descriptions", file, check=False)
    assert_clean_failure(proc, "no description for 1 of the 3 questions with an image", f"{bench.ids[0]} (",
                         "stic describe")
    file.write_text(json.dumps(records[0]) + "\n{\"image\": 1}\n")
    assert_clean_failure(stic_eval(tiny_model, bench, tmp_path / "x", "--descriptions", file, check=False),
                         "descriptions.jsonl:2: a record without a string \"image\"")
    proc = stic_eval(tiny_model, bench, tmp_path / "x", "--descriptions", file, "--dar", check=False)
    assert proc.returncode == 2 and "--dar" in proc.stderr
