"""`stic eval-score` against the official scorers on inputs where Python's semantics decide the verdict: raw
prediction text, decimal digits of other scripts, `str.split()`/`str.strip()` whitespace, LLaVA's line-by-line
pairing, TextVQA's (image, question) join, MMBench's option columns, MathVista's GitHub layout.

Where the official scorer is installed (LLaVA's `eval_science_qa.py`, `eval_textvqa.py` and `m4c_evaluator.py`, from
`llava-torch`), it runs here on the same files; elsewhere the test runs the official line itself (pandas' `read_csv`
and `pd.isna` for VLMEvalKit's `build_choices`, `float()`, `int()`, `str.split()`) and names it."""
import ast
import contextlib
import importlib
import io
import json
import math
import runpy
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

import eval_data
from conftest import run_stic, run_stic_json
from test_eval import StubJudge, assert_clean_failure, read_jsonl, stic_eval, tiny_model, write_predictions  # noqa: F401


def llava_eval_module(name):
    """`llava.eval.<name>` of llava-torch without `llava/__init__.py`, which would import the whole model zoo."""
    if "llava" not in sys.modules:
        spec = importlib.util.find_spec("llava")
        package = types.ModuleType("llava")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["llava"] = package
    return importlib.import_module(f"llava.eval.{name}")


def score(bench_name, preds, data, *extra):
    [summary] = run_stic_json("eval-score", "--benchmark", bench_name, "--predictions", preds, "--data", data, *extra)
    return summary


def llava_answers(path, rows):
    """LLaVA's answer-file lines: (question_id, prompt, text)."""
    path.write_text("".join(json.dumps({"question_id": q, "prompt": p, "text": t, "answer_id": "x", "model_id": "llava",
                                        "metadata": {}}) + "\n" for q, p, t in rows))
    return path


# ---------------------------------------------------------------- ScienceQA: eval_science_qa.py itself

def official_scienceqa(base_dir, result_file, tmp_path):
    """Runs llava/eval/eval_science_qa.py on the files and returns its (Accuracy, IMG-Accuracy) in percent."""
    argv = sys.argv
    sys.argv = ["eval_science_qa.py", "--base-dir", str(base_dir), "--result-file", str(result_file),
                "--output-file", str(tmp_path / "official_output.json"),
                "--output-result", str(tmp_path / "official_result.json")]
    printed = io.StringIO()
    try:
        llava_eval_module("m4c_evaluator")  # makes the llava package importable the light way
        with contextlib.redirect_stdout(printed):
            runpy.run_module("llava.eval.eval_science_qa", run_name="__main__")
    finally:
        sys.argv = argv
    line = printed.getvalue().strip().splitlines()[-1]
    accuracy = float(line.split("Accuracy: ")[1].split("%")[0])
    img_accuracy = float(line.split("IMG-Accuracy: ")[1].split("%")[0])
    return accuracy, img_accuracy


def test_scienceqa_reads_raw_predictions_as_eval_science_qa(tmp_path):
    bench = eval_data.scienceqa(tmp_path / "data")
    (bench.path / "pid_splits.json").write_text(json.dumps({"test": [r[0] for r in eval_data.SCIENCEQA_RECORDS]}))
    # "A " and "\nB" are no answers to the official script (it compares the text as it is); "C. coffee" is C.
    texts = {"4": "A ", "5": "A", "7": "\nB", "12": "C. coffee"}
    prompts = {r[0]: ("<image>\n" if r[1] else "") + r[4] for r in eval_data.SCIENCEQA_RECORDS}
    answers = llava_answers(tmp_path / "answers.jsonl", [(i, prompts[i], t) for i, t in texts.items()])
    accuracy, img_accuracy = official_scienceqa(bench.path, answers, tmp_path)
    assert (accuracy, img_accuracy) == (50.0, pytest.approx(100 / 3, abs=0.01))
    assert score("scienceqa", answers, bench.path)["accuracy"] == pytest.approx(img_accuracy / 100, abs=1e-4)
    # with the text-only question answered too, as the official run does: Accuracy over all, IMG-Accuracy apart
    summary = score("scienceqa", answers, bench.path, "--with-text-only")
    assert summary["accuracy"] == accuracy / 100
    assert summary["extra"]["img_accuracy"] == pytest.approx(img_accuracy / 100, abs=1e-4)


def test_scienceqa_missing_prediction_is_failed_as_in_eval_science_qa(tmp_path):
    """eval_science_qa.py walks every problem of the split and grades one without a prediction as the text FAILED
    with the prompt "Unknown": wrong in Accuracy, and (no `<image>` in that prompt) not in IMG-Accuracy."""
    bench = eval_data.scienceqa(tmp_path / "data")
    (bench.path / "pid_splits.json").write_text(json.dumps({"test": [r[0] for r in eval_data.SCIENCEQA_RECORDS]}))
    prompts = {r[0]: ("<image>\n" if r[1] else "") + r[4] for r in eval_data.SCIENCEQA_RECORDS}
    answered = dict(list({"4": "A", "5": "A", "7": "B", "12": "C"}.items())[::2])
    answers = llava_answers(tmp_path / "answers.jsonl", [(i, prompts[i], t) for i, t in answered.items()])
    accuracy, img_accuracy = official_scienceqa(bench.path, answers, tmp_path)
    summary = score("scienceqa", answers, bench.path, "--with-text-only")
    assert summary["missing_predictions"] == len(eval_data.SCIENCEQA_RECORDS) - len(answered)
    assert summary["total"] == len(eval_data.SCIENCEQA_RECORDS) and summary["answered"] == len(answered)
    assert summary["accuracy"] * 100 == pytest.approx(accuracy, abs=0.01)
    assert summary["extra"]["img_accuracy"] * 100 == pytest.approx(img_accuracy, abs=0.01)


# ---------------------------------------------------------------- TextVQA: eval_textvqa.py itself

def official_textvqa(annotation_file, result_file):
    """eval_single of llava/eval/eval_textvqa.py: its printed accuracy, in percent."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        llava_eval_module("eval_textvqa").eval_single(str(annotation_file), str(result_file))
    return float(printed.getvalue().split("Accuracy: ")[1].split("%")[0])


def test_textvqa_matches_eval_textvqa_with_a_repeated_question_and_python_text_rules(tmp_path):
    bench = eval_data.textvqa(tmp_path / "data")
    (camera_image, _, camera_prompt, *_), (lenses_image, _, lenses_prompt, *_), (drink_image, _, drink_prompt, *_) = \
        eval_data.TEXTVQA
    # A second line asking the camera question again (in other case), and a second annotation of that question
    # (another question id, other answers): eval_textvqa.py keys the annotations by (image, lowercased question),
    # so the last annotation grades both lines, each line on its own.
    questions = bench.path / "llava_textvqa_val_v051_ocr.jsonl"
    lines = read_jsonl(questions)
    repeat_prompt = camera_prompt.replace("what is the brand", "What is the Brand")
    lines.append({**lines[0], "text": repeat_prompt})
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    annotations_path = bench.path / "TextVQA_0.5.1_val.json"
    annotations = json.loads(annotations_path.read_text())
    answers_of = {34603: ["٢٠"] * 10, 34610: ["coke coke"] * 10}
    annotations["data"] = [{**a, "answers": answers_of.get(a["question_id"], a["answers"])} for a in annotations["data"]]
    annotations["data"].append({**annotations["data"][0], "question_id": 34699, "answers": ["nikon"] * 10})
    annotations_path.write_text(json.dumps(annotations))

    processor = llava_eval_module("m4c_evaluator").EvalAIAnswerProcessor()
    assert processor("nikon\x1c") == "nikon", "str.strip() drops U+001C"
    assert processor("٢.٠") == "٢.٠", "PERIOD_STRIP's (?!\\d) keeps a period before an Arabic-Indic digit"
    assert processor("coke\x1fcoke") == "coke coke", "str.split() splits at U+001F"
    rows = [
        (camera_image, camera_prompt, "nikon\x1c"),  # right
        (camera_image, repeat_prompt, "dakota"),      # graded by the last annotation (nikon) too: wrong
        (lenses_image, lenses_prompt, "٢.٠"),         # not "٢٠": wrong
        (drink_image, drink_prompt, "coke\x1fcoke"),  # right
    ]
    answers = llava_answers(tmp_path / "answers.jsonl", rows)
    official = official_textvqa(annotations_path, answers)
    assert official == pytest.approx(50.0)
    summary = score("textvqa", answers, bench.path)
    assert summary["answered"] == summary["items"] == 4 and summary["unmatched_predictions"] == 0
    assert summary["accuracy"] * 100 == pytest.approx(official)
    # stic's own prediction file names the repeated line `<question id>#2`
    preds = write_predictions(tmp_path / "p.jsonl", {"34699": "nikon", "34603": "x", "34610": "x", "34699#2": "nikon"})
    assert score("textvqa", preds, bench.path)["correct"] == 2.0


# ---------------------------------------------------------------- ChartQA: relaxed accuracy on the raw text

def official_relaxed_correct(prediction, target):
    """The relaxed accuracy of lmms-eval's chartqa task (from Pix2Struct), on the raw prediction: float() of
    both (a trailing % divides by 100), within 5 % of a non-zero target; otherwise lower() equality."""
    def number(text):
        try:
            return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
        except ValueError:
            return None
    p, t = number(prediction), number(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= 0.05
    return prediction.lower() == target.lower()


def test_chartqa_compares_raw_text_and_reads_any_decimal_digits(tmp_path):
    bench = eval_data.chartqa(tmp_path / "data")
    labels = {"human_0": "14", "augmented_0": "23.5", "augmented_1": "Japan"}
    cases = [
        {"human_0": "١٤", "augmented_0": "２３.５", "augmented_1": "Japan "},   # float() reads them; "Japan " != "japan"
        {"human_0": "14\x1c", "augmented_0": " 23.5\u3000", "augmented_1": "japan"},  # float() strips U+3000, not U+001C
    ]
    for n, preds in enumerate(cases):
        expected = sum(official_relaxed_correct(preds[i], labels[i]) for i in bench.ids)
        summary = score("chartqa", write_predictions(tmp_path / f"p{n}.jsonl", preds), bench.path)
        assert summary["correct"] == expected, (preds, summary)
    assert [official_relaxed_correct(cases[0][i], labels[i]) for i in bench.ids] == [True, True, False]
    assert [official_relaxed_correct(cases[1][i], labels[i]) for i in bench.ids] == [False, True, True]


# ---------------------------------------------------------------- MMBench: VLMEvalKit's choices

def test_mmbench_choices_are_the_columns_pandas_reads_as_text(tmp_path):
    """VLMEvalKit (2024) builds the choices of a row as `{c: item[c] for c in A..Z if not pd.isna(item[c])}` on the
    TSV read by pandas: an option that reads "none" is a choice; "None" is NaN to pandas 2 and is not (the letters
    of the others stay). LLaVA's get_options stopped at both, and --circular refused such a row."""
    root = tmp_path / "data"
    root.mkdir()
    image = eval_data.base64.b64encode((eval_data.IMAGES / "chelsea.png").read_bytes()).decode()
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "image"],
            ["0", "Which is a fruit?", "nan", "stone", "sand", "none", "apple", "D", image],
            ["1", "Is it a cat?", "nan", "yes", "None", "no", "", "C", image]]
    tsv = root / "mmbench_dev_20230712.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    table = pd.read_csv(tsv, sep="\t")
    official_choices = [{c: row[c] for c in "ABCD" if c in row and not pd.isna(row[c])} for _, row in table.iterrows()]
    assert official_choices == [{"A": "stone", "B": "sand", "C": "none", "D": "apple"}, {"A": "yes", "C": "no"}]
    # answers by option text, as can_infer_text matches them: right exactly when the text is one of the choices
    preds = write_predictions(tmp_path / "p.jsonl", {"0": "It is an apple.", "1": "no"})
    summary = score("mmbench", preds, root)
    assert summary["extra"]["plain_correct"] == 2
    circular = {"0": "apple", "1000000": "apple", "2000000": "apple", "3000000": "apple", "1": "no", "1000001": "no"}
    summary = score("mmbench", write_predictions(tmp_path / "c.jsonl", circular), root, "--circular")
    assert summary["answered"] == 6 and summary["accuracy"] == 1.0


def test_mmbench_missing_prediction_is_nan_and_its_circular_group_wrong(tmp_path):
    """convert_mmbench_for_submission.py leaves an unanswered row's prediction empty; VLMEvalKit reads the sheet with
    pandas (NaN) and grades `str(prediction)`, "nan": no option letter, so wrong, and so is the row's circular
    group (every variant must be right)."""
    bench = eval_data.mmbench(tmp_path / "data")
    sheet = tmp_path / "upload.tsv"
    sheet.write_text("index\tprediction\n0\tB\n1000000\t\n")
    read = pd.read_csv(sheet, sep="\t")
    assert [str(x) for x in read["prediction"]] == ["B", "nan"]
    right = {i: p for i, p in zip(bench.ids, ["B", "a launch", "A"])}
    full = score("mmbench", write_predictions(tmp_path / "full.jsonl", right), bench.path)
    assert full["missing_predictions"] == 0 and full["extra"]["plain_correct"] == 3 and full["accuracy"] == 1.0
    without_copy = {i: p for i, p in right.items() if i != "1000000"}
    summary = score("mmbench", write_predictions(tmp_path / "p.jsonl", without_copy), bench.path)
    assert summary["missing_predictions"] == 1 and summary["answered"] == 2
    assert summary["extra"]["plain_total"] == 3 and summary["extra"]["plain_correct"] == 2
    assert summary["accuracy"] == 0.5, "group 0 lost its copy: wrong; group 1 right"
    circular = {"0": "cat", "1000000": "cat", "1": "a launch", "1000001": "a launch", "2000001": "a launch",
                "3000001": "a launch"}
    summary = score("mmbench", write_predictions(tmp_path / "c.jsonl", circular), bench.path, "--circular")
    assert summary["missing_predictions"] == 1 and summary["accuracy"] == 0.5


def llava_get_options():
    """`get_options` of the pinned llava/eval/model_vqa_mmbench.py with its `is_none` and `all_options`, compiled from
    that file's source alone (importing the module would load LLaVA's whole model code)."""
    llava_eval_module("m4c_evaluator")  # the llava package, the light way
    path = Path(sys.modules["llava"].__path__[0]) / "eval" / "model_vqa_mmbench.py"
    tree = ast.parse(path.read_text())
    wanted = [node for node in tree.body
              if isinstance(node, ast.FunctionDef) and node.name in ("is_none", "get_options")
              or isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "all_options" for t in node.targets)]
    assert len(wanted) == 3, "model_vqa_mmbench.py changed"
    namespace = {"math": math}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["get_options"], namespace["all_options"]


def test_mmbench_official_options_are_llava_get_options(tiny_model, tmp_path):
    """With --mmbench-options official the prompt lists what LLaVA's get_options lists (A-D up to the first option
    is_none rejects: "none", "nan", or a cell pandas reads as NaN), built as model_vqa_mmbench.py builds it (hint,
    question, "X. option" lines, --single-pred-prompt); summary.json counts the questions it cuts."""
    get_options, all_options = llava_get_options()
    root = tmp_path / "data"
    root.mkdir()
    image = eval_data.base64.b64encode((eval_data.IMAGES / "chelsea.png").read_bytes()).decode()
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "image"],
            ["0", "Which is a fruit?", "nan", "stone", "sand", "none", "apple", "D", image],
            ["1", "Is it a cat?", "Look closely.", "yes", "None", "no", "", "C", image],
            ["2", "Which colour?", "nan", "red", "NAN", "blue", "green", "A", image],
            ["3", "How many?", "nan", "one", "two", "three", "four", "B", image]]
    tsv = root / "mmbench_dev_20230712.tsv"
    tsv.write_text("".join("\t".join(r) + "\n" for r in rows))
    expected = {}
    for _, row in pd.read_table(tsv).iterrows():
        question = row["question"] if pd.isna(row["hint"]) else row["hint"] + "\n" + row["question"]
        for letter, option in zip(all_options, get_options(row, all_options)):
            question += "\n" + letter + ". " + option
        expected[str(row["index"])] = question + "\n" + "Answer with the option's letter from the given choices directly."
    out = tmp_path / "official"
    stic_eval(tiny_model, eval_data.Bench("mmbench", root, list(expected), expected, tsv.name), out,
              "--mmbench-options", "official")
    prompts = {r["id"]: r["prompt"] for r in read_jsonl(out / "predictions.jsonl")}
    assert prompts == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extra"]["options_cut"] == 3 and summary["provenance"]["benchmark"]["mmbench_options"] == "official"
    # the default lists every option the scorer reads, and counts the same cuts
    summary = score("mmbench", out / "predictions.jsonl", root)
    assert summary["extra"]["options_cut"] == 3


# ---------------------------------------------------------------- MathVista

def test_mathvista_int_and_float_read_any_decimal_digits(tmp_path):
    bench = eval_data.mathvista(tmp_path / "data")
    # extract_answer.py: int(response) / float(response) before anything else; calculate_score.py compares
    # str(int(float(x))) and str(round(float(x), precision)) with the answer.
    responses = {"1": "B", "2": "١.٤٥", "10": "\u3000١٤\u3000"}
    assert str(int(responses["10"])) == "14" and str(round(float(responses["2"]), 2)) == "1.45"
    summary = score("mathvista", write_predictions(tmp_path / "p.jsonl", responses), bench.path)
    assert summary["correct"] == 3.0


def test_mathvista_github_layout_reads_query_json(tmp_path):
    """lupantech/MathVista's data/testmini.json has no `query`; generate_response.py reads the prompts from
    data/query.json beside it."""
    bench = eval_data.mathvista(tmp_path / "data")
    problems = json.loads((bench.path / "testmini.json").read_text())
    queries = {pid: problem.pop("query") for pid, problem in problems.items()}
    (bench.path / "testmini.json").write_text(json.dumps(problems, indent=4))
    preds = write_predictions(tmp_path / "p.jsonl", {"1": "B", "2": "1.45", "10": "13"})
    proc = run_stic("eval-score", "--benchmark", "mathvista", "--predictions", preds, "--data", bench.path, check=False)
    assert_clean_failure(proc, "query.json")
    (bench.path / "query.json").write_text(json.dumps(queries, indent=4))
    assert score("mathvista", preds, bench.path)["correct"] == 2.0


def test_textvqa_and_mathvista_leave_a_missing_prediction_out_as_their_scorers_do(tmp_path):
    """eval_textvqa.py scores the lines of the answer file and MathVista's calculate_score.py the problems of its
    results file: an unanswered question is in neither denominator; summary.json counts it."""
    bench = eval_data.textvqa(tmp_path / "data")
    (image_id, _, prompt, *_), *_ = eval_data.TEXTVQA
    answers = llava_answers(tmp_path / "answers.jsonl", [(image_id, prompt, "dakota")])
    official = official_textvqa(bench.path / "TextVQA_0.5.1_val.json", answers)
    summary = score("textvqa", answers, bench.path)
    assert summary["accuracy"] * 100 == pytest.approx(official)
    assert summary["missing_predictions"] == len(eval_data.TEXTVQA) - 1 and summary["total"] == 1
    bench = eval_data.mathvista(tmp_path / "mathvista")
    summary = score("mathvista", write_predictions(tmp_path / "m.jsonl", {"1": "B"}), bench.path)
    assert (summary["total"], summary["missing_predictions"]) == (1, len(bench.ids) - 1)


# ---------------------------------------------------------------- the judges' replies

def test_judge_scores_in_fullwidth_digits_are_read_as_float_reads_them(tmp_path):
    # parse_score of eval_gpt_review_bench.py: float(sp[0]), float(sp[1]) of the first line split at " ".
    review = "８ ７\nAssistant 2 is fine."
    first = review.split("\n")[0].replace(",", " ").split(" ")
    assert [float(x) for x in first] == [8.0, 7.0]
    bench = eval_data.llava_bench(tmp_path / "data")
    preds = write_predictions(tmp_path / "p.jsonl", {"0": "a", "1": "b", "2": "c"})
    stub = StubJudge(lambda request: review)
    try:
        summary = score("llava-bench", preds, bench.path, "--judge-url", stub.url, "--judge-key-env", "NO_SUCH_KEY")
    finally:
        stub.close()
    assert summary["judge"]["unparsable_scores"] == 0
    assert summary["extra"]["categories"]["all"] == {"relative": 87.5, "reference": 80.0, "model": 70.0}

    # mm-vet_evaluator.py: float(content.split(" ")[0].strip()) in [0, 1]
    assert float("０.５".split(" ")[0].strip()) == 0.5
    bench = eval_data.mm_vet(tmp_path / "mmvet")
    preds = write_predictions(tmp_path / "m.jsonl", {i: "x" for i in bench.ids})
    stub = StubJudge(lambda request: "０.５")
    try:
        summary = score("mm-vet", preds, bench.path, "--judge-url", stub.url, "--judge-key-env", "NO_SUCH_KEY")
    finally:
        stub.close()
    assert summary["accuracy"] == 0.5 and summary["judge"]["unparsable_scores"] == 0


# ---------------------------------------------------------------- LLaVA-Bench: the reviewer zips files by line

def test_llava_bench_answer_file_is_complete_or_not_written(tmp_path):
    """eval_gpt_review_bench.py reads `zip(questions, answers_gpt4, answers)`: the answer file must have one line per
    question, in the question file's order, or every later answer is reviewed against the wrong question."""
    bench = eval_data.llava_bench(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    preds = write_predictions(run / "predictions.jsonl", {"0": "a rocket", "2": "a stunt"})
    proc = run_stic("eval-score", "--benchmark", "llava-bench", "--predictions", preds, "--data", bench.path,
                    check=False)
    assert_clean_failure(proc, "1 of 3 questions have no prediction (ids 1)", "--judge-url")
    assert not (run / "llava_bench_answers.jsonl").exists()

    write_predictions(preds, {"2": "a stunt", "0": "a rocket", "1": "smoke"})
    score("llava-bench", preds, bench.path)
    questions = read_jsonl(bench.path / "questions.jsonl")
    answers = read_jsonl(run / "llava_bench_answers.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert [a["text"] for a in answers] == ["a rocket", "smoke", "a stunt"]
