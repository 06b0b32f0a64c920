"""Small synthetic benchmark folders in the published layouts `stic eval` reads (LLaVA-1.5's
playground/data/eval/<benchmark>/ folders), with copies of the real photos in data/images; and, for the
benchmarks released as parquet on the Hugging Face hub, the same questions in those releases' schemas.

Every builder returns a `Bench`: the folder, the item ids in the order the loader yields them, and the user
prompt the LLaVA-1.5 evaluation scripts build for each item (what the `prompt` field of a prediction holds).
"""
import base64
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "data" / "images"

ANSWER_LETTER = "Answer with the option's letter from the given choices directly."
ANSWER_SHORT = "Answer the question using a single word or phrase."


@dataclass
class Bench:
    name: str
    path: Path
    ids: list
    prompts: dict = field(default_factory=dict)  # id -> the question prompt (without <image>)
    removable: str = ""  # a required file: the tests delete it and expect its name in the error


def _copy(photo, dst):
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(IMAGES / photo, dst)
    return dst


def _jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


# The `datasets` Image feature as parquet stores it: the encoded file and its name.
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _image(photo):
    return {"bytes": (IMAGES / photo).read_bytes(), "path": photo}


def _parquet(path, schema, rows, compression="snappy"):
    """One shard of a hub release; `datasets` writes snappy, the other codecs are read too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression=compression)
    return path


# ---------------------------------------------------------------- ScienceQA-IMG

SCIENCEQA_RECORDS = [
    # (id, photo, hint, question, the human turn of llava_test_CQM-A.json, its gpt turn's letter, choices, answer)
    ("4", "camera.png", "Select the best answer.", "Which tool is used to take photos?",
     "Context: Select the best answer.\nWhich tool is used to take photos?\nA. a camera\nB. a spoon\nC. a hammer",
     "A", ["a camera", "a spoon", "a hammer"], 0),
    ("5", None, "", "Which word comes first in alphabetical order?",
     "Which word comes first in alphabetical order?\nA. cat\nB. dog", "A", ["cat", "dog"], 0),
    ("7", "chelsea.png", "", "Which animal is shown?", "Which animal is shown?\nA. dog\nB. cat", "B", ["dog", "cat"], 1),
    ("12", "coffee.png", "Look at the picture.", "What is in the cup?",
     "Context: Look at the picture.\nWhat is in the cup?\nA. tea\nB. milk\nC. coffee\nD. juice", "C",
     ["tea", "milk", "coffee", "juice"], 2),
]


def scienceqa(root, with_problems=True):
    """llava_test_CQM-A.json (LLaVA's conversation list; the text-only question is skipped), images/test/<id>/image.png
    and ScienceQA's problems.json (the answers agree with the gpt turns; the loader reads either)."""
    root = Path(root)
    records, problems, ids, prompts = [], {}, [], {}
    for qid, photo, hint, question, text, letter, choices, answer in SCIENCEQA_RECORDS:
        record = {"id": qid, "conversations": [
            {"from": "human", "value": ("<image>\n" + text) if photo else text},
            {"from": "gpt", "value": letter if qid != "7" else f"The answer is {letter}."}]}
        if photo:
            record["image"] = f"{qid}/image.png"
            _copy(photo, root / "images" / "test" / qid / "image.png")
            ids.append(qid)
            prompts[qid] = f"{text}\n{ANSWER_LETTER}"
        records.append(record)
        problems[qid] = {"question": question, "choices": choices, "answer": answer,
                         "image": "image.png" if photo else None, "split": "test", "hint": hint}
    (root / "images" / "test").mkdir(parents=True, exist_ok=True)
    (root / "llava_test_CQM-A.json").write_text(json.dumps(records, indent=2))
    if with_problems:
        (root / "problems.json").write_text(json.dumps(problems))
    return Bench("scienceqa", root, ids, prompts, "llava_test_CQM-A.json")


SCIENCEQA_TEXT = ["task", "grade", "subject", "topic", "category", "skill", "lecture", "solution"]


def scienceqa_parquet(root):
    """data/test-*.parquet of derek-thomas/ScienceQA: the problems of `scienceqa` without their ids (the release has
    none, so items are named by row), images embedded, a null image for the text-only problem."""
    root = Path(root)
    schema = pa.schema([("image", IMAGE), ("question", pa.string()), ("choices", pa.list_(pa.string())),
                        ("answer", pa.int8()), ("hint", pa.string()), *[(c, pa.string()) for c in SCIENCEQA_TEXT]])
    rows, ids, prompts = [], [], {}
    for row, (_, photo, hint, question, text, _, choices, answer) in enumerate(SCIENCEQA_RECORDS):
        rows.append({"image": _image(photo) if photo else None, "question": question, "choices": choices,
                     "answer": answer, "hint": hint, **{c: "" for c in SCIENCEQA_TEXT}})
        if photo:
            ids.append(str(row))
            prompts[str(row)] = f"{text}\n{ANSWER_LETTER}"
    shard = _parquet(root / "data" / "test-00000-of-00001-f0e719df791966ff.parquet", schema, rows)
    return Bench("scienceqa", root, ids, prompts, str(shard.relative_to(root)))


# ---------------------------------------------------------------- TextVQA val

TEXTVQA = [
    # (image id, photo, LLaVA prompt, annotation question, question_id, answers)
    ("003a8ae2ef43b901", "camera.png",
     "what is the brand of this camera?\nReference OCR token: dakota, digital\n" + ANSWER_SHORT,
     "what is the brand of this camera?", 34602, ["dakota"] * 9 + ["dakota digital"]),
    ("003a8ae2ef43b901", "camera.png",
     "How many lenses are there?\n" + ANSWER_SHORT,
     "how many lenses are there?", 34603, ["2"] * 10),
    ("0054c91397f2fe05", "rocket.jpg",
     "what drink is advertised?\nReference OCR token: Coca-Cola, SALE\n" + ANSWER_SHORT,
     "what drink is advertised?", 34610, ["coca cola"] * 3 + ["coke"] * 7),
]


def textvqa(root):
    """llava_textvqa_val_v051_ocr.jsonl (question_id = image id, as LLaVA ships it), TextVQA_0.5.1_val.json and
    train_images/<image id>.jpg (TextVQA's images are JPEGs)."""
    root = Path(root)
    lines, data, ids, prompts = [], [], [], {}
    for image_id, photo, text, question, qid, answers in TEXTVQA:
        img = root / "train_images" / f"{image_id}.jpg"
        if not img.exists():
            if photo.endswith(".jpg"):
                _copy(photo, img)
            else:
                from PIL import Image
                img.parent.mkdir(parents=True, exist_ok=True)
                Image.open(IMAGES / photo).convert("RGB").save(img, "JPEG", quality=90)
        lines.append({"question_id": image_id, "image": f"{image_id}.jpg", "text": text, "category": "default"})
        data.append({"question": question, "image_id": image_id, "image_classes": ["Camera"], "flickr_original_url": "",
                     "flickr_300k_url": "", "image_width": 1024, "image_height": 768, "question_tokens": question.split(),
                     "question_id": qid, "set_name": "val", "image_name": image_id, "answers": answers})
        ids.append(str(qid))
        prompts[str(qid)] = text
    _jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", lines)
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_type": "val", "dataset_name": "textvqa",
                                                             "dataset_version": "0.5.1", "data": data}))
    return Bench("textvqa", root, ids, prompts, "TextVQA_0.5.1_val.json")


# ---------------------------------------------------------------- ChartQA test

CHARTQA = {
    "human": [("41699051005347.png", "logo.png", "How many food items are shown in the bar graph?", "14")],
    "augmented": [("multi_col_1.png", "astronaut.png", "What is the value in 2019?", 23.5),
                  ("two_col_2.png", "coffee.png", "Which country is the largest?", "Japan")],
}


def _chartqa_prompts():
    """Item id ({split}_{position in the split}) -> prompt, in item order."""
    return {f"{split}_{i}": f"{query}\n{ANSWER_SHORT}"
            for split, records in CHARTQA.items() for i, (_, _, query, _) in enumerate(records)}


def chartqa(root):
    """test/test_human.json and test/test_augmented.json of the ChartQA release ({imgname, query, label}) with png/."""
    root = Path(root)
    for split, records in CHARTQA.items():
        for imgname, photo, _, _ in records:
            _copy(photo, root / "png" / imgname)
        rows = [{"imgname": imgname, "query": query, "label": label} for imgname, _, query, label in records]
        (root / f"test_{split}.json").write_text(json.dumps(rows))
    prompts = _chartqa_prompts()
    return Bench("chartqa", root, list(prompts), prompts, "test_augmented.json")


def chartqa_parquet(root):
    """data/test-*.parquet of HuggingFaceM4/ChartQA: both splits in one table (human_or_machine: 0 human, 1 machine),
    each label a one-element list of strings; zstd-compressed."""
    root = Path(root)
    schema = pa.schema([("image", IMAGE), ("query", pa.string()), ("label", pa.list_(pa.string())),
                        ("human_or_machine", pa.int64())])
    rows = [{"image": _image(photo), "query": query, "label": [str(label)], "human_or_machine": split}
            for split, records in enumerate(CHARTQA.values()) for _, photo, query, label in records]
    shard = _parquet(root / "data" / "test-00000-of-00001-e2cd0b7a0f9eb20d.parquet", schema, rows, "zstd")
    prompts = _chartqa_prompts()
    return Bench("chartqa", root, list(prompts), prompts, str(shard.relative_to(root)))


# ---------------------------------------------------------------- LLaVA-Bench (in the wild)

LLAVA_BENCH = [
    (0, "001.jpg", "What is flying in the sky?", "conv", "A rocket is flying in the sky."),
    (1, "001.jpg", "Describe this photo in detail.", "detail", "A rocket lifts off from a launch pad, leaving smoke."),
    (2, "002.jpg", "Why might this man be ironing on a taxi?", "complex", "It is an extreme-ironing stunt."),
]


def llava_bench(root):
    """questions.jsonl, context.jsonl, answers_gpt4.jsonl and images/ of liuhaotian/llava-bench-in-the-wild."""
    root = Path(root)
    _copy("rocket.jpg", root / "images" / "001.jpg")
    _copy("extreme_ironing.jpg", root / "images" / "002.jpg")
    _jsonl(root / "questions.jsonl", [{"question_id": q, "image": img, "text": text, "category": cat}
                                      for q, img, text, cat, _ in LLAVA_BENCH])
    _jsonl(root / "context.jsonl", [
        {"id": "001", "image": "001.jpg", "caption": ["A rocket launch.", "Smoke billows below it."]},
        {"id": "002", "image": "002.jpg", "caption": "A man irons clothes on the back of a yellow taxi."}])
    _jsonl(root / "answers_gpt4.jsonl", [{"question_id": q, "prompt": text, "text": ref, "answer_id": f"a{q}",
                                          "model_id": "gpt-4-0314", "metadata": {}}
                                         for q, _, text, _, ref in LLAVA_BENCH])
    ids = [str(q) for q, *_ in LLAVA_BENCH]
    return Bench("llava-bench", root, ids, {str(q): text for q, _, text, _, _ in LLAVA_BENCH}, "answers_gpt4.jsonl")


# ---------------------------------------------------------------- MMBench dev

MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                  "l2-category", "comment", "split"]


# Cells in MMBENCH_HEADER order, the image cell naming the photo; pandas reads "nan" and "" as missing.
MMBENCH_ROWS = [
    [0, "What animal is this?", "nan", "dog", "cat", "horse", "", "B", "object_localization", "chelsea.png",
     "synthetic", "finegrained_perception (instance-level)", "nan", "dev"],
    [1, "What is happening?", "Look at the sky.", "a launch", "a parade", "a storm", "a concert", "A",
     "action_recognition", "rocket.jpg", "synthetic", "coarse_perception", "nan", "dev"],
    [1000000, "What animal is this?", "nan", "cat", "horse", "dog", "", "A", "object_localization", "chelsea.png",
     "synthetic", "finegrained_perception (instance-level)", "nan", "dev"],
]
MMBENCH_PROMPTS = {
    "0": f"What animal is this?\nA. dog\nB. cat\nC. horse\n{ANSWER_LETTER}",
    "1": f"Look at the sky.\nWhat is happening?\nA. a launch\nB. a parade\nC. a storm\nD. a concert\n{ANSWER_LETTER}",
    "1000000": f"What animal is this?\nA. cat\nB. horse\nC. dog\n{ANSWER_LETTER}",
}


def mmbench(root):
    """mmbench_dev_20230712.tsv: base64 images, a hint, a question with three options (D empty), and the file's own
    circular copy of row 0 (index 1000000) whose image cell refers to row 0."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    image = MMBENCH_HEADER.index("image")
    lines = []
    for row in MMBENCH_ROWS:
        cells = list(row)
        cells[image] = "0" if row[0] == 1000000 else base64.b64encode((IMAGES / row[image]).read_bytes()).decode()
        lines.append("\t".join(map(str, cells)) + "\n")
    (root / "mmbench_dev_20230712.tsv").write_text("\t".join(MMBENCH_HEADER) + "\n" + "".join(lines))
    return Bench("mmbench", root, list(MMBENCH_PROMPTS), MMBENCH_PROMPTS, "mmbench_dev_20230712.tsv")


def mmbench_parquet(root, integer_index=False):
    """en/dev-*.parquet of lmms-lab/MMBench (its column order, `index` a string, `L2-category`), or with
    `integer_index` data/dev-*.parquet of lmms-lab/MMBench_EN (the TSV's column order, `index` an int64): the rows of
    `mmbench`, missing cells null, every row with its own image."""
    root = Path(root)
    types = {"index": pa.int64() if integer_index else pa.string(), "image": IMAGE}
    names = list(MMBENCH_HEADER) if integer_index else [
        "index", "question", "hint", "answer", "A", "B", "C", "D", "category", "image", "source", "L2-category",
        "comment", "split"]
    schema = pa.schema([(name, types.get(name, pa.string())) for name in names])
    rows = []
    for row in MMBENCH_ROWS:
        cells = dict(zip(MMBENCH_HEADER, row), image=_image(row[MMBENCH_HEADER.index("image")]))
        cells["L2-category"] = cells["l2-category"]
        cells = {name: None if value in ("nan", "") else value for name, value in cells.items()}
        cells["index"] = row[0] if integer_index else str(row[0])
        rows.append({name: cells[name] for name in names})
    folder = "data" if integer_index else "en"
    shard = _parquet(root / folder / "dev-00000-of-00001.parquet", schema, rows)
    return Bench("mmbench", root, list(MMBENCH_PROMPTS), MMBENCH_PROMPTS, str(shard.relative_to(root)))


# ---------------------------------------------------------------- MM-Vet

MM_VET = {
    "v1_0": {"imagename": "v1_0.png", "capability": ["rec", "know"], "question": "What is the animal in the picture?",
             "answer": "cat<OR>kitten"},
    "v1_10": {"imagename": "v1_10.jpg", "capability": ["rec"], "question": "What vehicle is this?", "answer": "rocket"},
    "v1_2": {"imagename": "v1_2.png", "capability": ["ocr", "math"], "question": "How many cups are there?",
             "answer": "1"},
}


def mm_vet(root):
    """mm-vet.json (id -> record) and images/ of the MM-Vet release; ids come back in the file's order (the official
    grader's), which here is not the natural one."""
    root = Path(root)
    for photo, name in (("chelsea.png", "v1_0.png"), ("rocket.jpg", "v1_10.jpg"), ("coffee.png", "v1_2.png")):
        _copy(photo, root / "images" / name)
    (root / "mm-vet.json").write_text(json.dumps(MM_VET, indent=2))
    ids = list(MM_VET)
    return Bench("mm-vet", root, ids, {i: MM_VET[i]["question"] for i in ids}, "mm-vet.json")


# ---------------------------------------------------------------- MathVista testmini

MATHVISTA_HINT_CHOICE = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
MATHVISTA = {
    "1": {"question": "What fraction of the shape is blue?", "image": "images/1.jpg", "choices": ["3/11", "8/11"],
          "unit": None, "precision": None, "answer": "8/11", "question_type": "multi_choice", "answer_type": "text",
          "query": f"{MATHVISTA_HINT_CHOICE}\nQuestion: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11"},
    "2": {"question": "How much money does Luca need?", "image": "images/2.png", "choices": None, "unit": None,
          "precision": 2.0, "answer": "1.45", "question_type": "free_form", "answer_type": "float",
          "query": "Hint: Please answer the question requiring a floating-point number with two decimal places and "
                   "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.\nQuestion: How much money does Luca need?"},
    "10": {"question": "How many objects are there?", "image": "images/10.jpg", "choices": None, "unit": None,
           "precision": None, "answer": "14", "question_type": "free_form", "answer_type": "integer",
           "query": "Hint: Please answer the question requiring an integer answer and provide the final value, "
                    "e.g., 1, 2, 3, at the end.\nQuestion: How many objects are there?"},
}


MATHVISTA_PHOTOS = {"1": "waterview.jpg", "2": "logo.png", "10": "extreme_ironing.jpg"}
MATHVISTA_METADATA = {"category": "math-targeted-vqa", "context": "synthetic scene", "grade": "elementary school",
                      "img_height": 427, "img_width": 640, "language": "english", "skills": ["arithmetic reasoning"],
                      "source": "synthetic", "split": "testmini", "task": "math word problem"}
MATHVISTA_IDS = ["1", "2", "10"]


def mathvista(root):
    """testmini.json (pid -> problem, as the MathVista release has it) and images/."""
    root = Path(root)
    for pid, photo in MATHVISTA_PHOTOS.items():
        _copy(photo, root / MATHVISTA[pid]["image"])
    problems = {pid: {"pid": pid, **p, "metadata": MATHVISTA_METADATA} for pid, p in MATHVISTA.items()}
    (root / "testmini.json").write_text(json.dumps(problems, indent=2))
    prompts = {i: MATHVISTA[i]["query"] for i in MATHVISTA_IDS}
    return Bench("mathvista", root, MATHVISTA_IDS, prompts, "testmini.json")


def mathvista_parquet(root):
    """data/testmini-*.parquet of AI4Math/MathVista: `image` the path inside images.zip, `decoded_image` the embedded
    file; gzip-compressed."""
    root = Path(root)
    metadata = pa.struct([(k, pa.int64() if k.startswith("img_") else pa.list_(pa.string()) if k == "skills"
                           else pa.string()) for k in MATHVISTA_METADATA])
    schema = pa.schema([("pid", pa.string()), ("question", pa.string()), ("image", pa.string()),
                        ("decoded_image", IMAGE), ("choices", pa.list_(pa.string())), ("unit", pa.string()),
                        ("precision", pa.float64()), ("answer", pa.string()), ("question_type", pa.string()),
                        ("answer_type", pa.string()), ("metadata", metadata), ("query", pa.string())])
    rows = [{"pid": pid, **p, "decoded_image": _image(MATHVISTA_PHOTOS[pid]), "metadata": MATHVISTA_METADATA}
            for pid, p in MATHVISTA.items()]
    shard = _parquet(root / "data" / "testmini-00000-of-00001-725687bf7a18d64b.parquet", schema, rows, "gzip")
    prompts = {i: MATHVISTA[i]["query"] for i in MATHVISTA_IDS}
    return Bench("mathvista", root, MATHVISTA_IDS, prompts, str(shard.relative_to(root)))


BUILDERS = {
    "scienceqa": scienceqa,
    "textvqa": textvqa,
    "chartqa": chartqa,
    "llava-bench": llava_bench,
    "mmbench": mmbench,
    "mm-vet": mm_vet,
    "mathvista": mathvista,
}


# The same questions as the LLaVA-layout builders, in the benchmarks' parquet releases on the hub.
PARQUET_BUILDERS = {
    "scienceqa": scienceqa_parquet,
    "chartqa": chartqa_parquet,
    "mmbench": mmbench_parquet,
    "mathvista": mathvista_parquet,
}


def build(name, root):
    return BUILDERS[name](root)
