"""Checks the shipped third_party/mistral-7b-tokenizer/tokenizer.json against sentencepiece.

Reference: sentencepiece on `tokenizer.model.v1` from the pinned mistral-common package (the
Mistral-7B tokenizer).  The shipped file is the HF fast (legacy=True) conversion plus the llava-hf
added tokens `<image>`=32000 and `<pad>`=32001; see third_party/mistral-7b-tokenizer/README.md.

Documented difference classes (README "Differences"):
  * identical           -- everything without special-token text: ids are exactly sentencepiece's
                           (`sp.encode(text)`, i.e. with the dummy-prefix "▁", without BOS).
  * special_token_text  -- text containing one of "<unk>", "<s>", "</s>", "<image>", "<pad>":
                           tokenizer.json maps each occurrence to its single id, and encodes every
                           non-empty piece between them as sentencepiece encodes that piece on its own
                           (so each piece gets its own dummy-prefix "▁"; llava-hf "legacy" behaviour).
                           sentencepiece itself spells such text out literally (e.g. "▁<", "image", ">").
"""

import hashlib
import importlib.util
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[2]
TOK_DIR = REPO / "third_party" / "mistral-7b-tokenizer"
TOK_JSON = TOK_DIR / "tokenizer.json"
SP_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}
SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_IDS) + ")")

PROMPT = "<s>[INST] <image>\nWhat is this? [/INST]"
# tokenizer.json, add_special_tokens=True: the post-processor BOS plus the literal "<s>" -> two BOS.
PROMPT_IDS = [1, 1, 733, 16289, 28793, 28705, 32000, 28705, 13, 3195, 349, 456, 28804, 733, 28748, 16289, 28793]


def _sp_model_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).resolve().parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def hf():
    return Tokenizer.from_file(str(TOK_JSON))


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(_sp_model_path()))


def build_corpus():
    lines = [
        # English prose
        "The quick brown fox jumps over the lazy dog.",
        "It was the best of times, it was the worst of times, it was the age of wisdom.",
        "Describe the image in detail. What objects are present, and how are they arranged?",
        "Mr. O'Neil's \"quoted\" text -- with dashes; semicolons: and (parentheses) [brackets] {braces}!",
        "Hello", "hello", "HELLO", "a", "I", ".", "?", "",
        # code
        "def forward(self, x: torch.Tensor) -> torch.Tensor:",
        "    return self.proj(x).softmax(dim=-1)  # comment",
        "fn main() { let v: Vec<u32> = (0..10).map(|x| x * 2).collect(); println!(\"{:?}\", v); }",
        "for (int i = 0; i < n; ++i) { a[i] += b[i] * c; }",
        "if __name__ == '__main__':\n\tmain()\n",
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
        '{"key": [1, 2.5, -3e-7, true, null], "nested": {"a": "b"}}',
        "<div class=\"x\"><span>text</span></div>",
        "x<y && y>z || !w",
        # numbers
        "0", "42", "3.14159265358979", "1,234,567.89", "-0.0001", "1e10", "2024-03-15T12:34:56Z",
        "+1 (555) 123-4567", "0x7fffffff", "10000000000000000000000000000000000",
        # unicode / CJK / emoji / accents / scripts
        "こんにちは世界", "你好，世界！今天天气很好。", "안녕하세요 세계", "Привет, мир!", "مرحبا بالعالم",
        "שלום עולם", "नमस्ते दुनिया", "Γειά σου Κόσμε", "ไทย ภาษา", "😀😃😄 🚀🌍 👨‍👩‍👧‍👦 🇫🇷",
        "café naïve résumé façade Ærøskøbing Straße señor",
        "e\u0301 combining acute vs \u00e9 precomposed", "zero\u200bwidth\u200cjoiner\u200d", "\ufeffBOM",
        "nbsp\u00a0here", "ideographic\u3000space", "math ∑∫√∞≈≠ ≤ ≥ → ⇒ ∀∃", "𓀀𓀁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀋",
        "private\ue000use", "control\x01\x07\x1fchars", "nul\x00byte", "del\x7f",
        "literal metaspace ▁ and ▁▁x", "<0x0A> <0xFF> literal byte piece names",
        # whitespace: multiple spaces, tabs, newlines, leading/trailing
        "two  spaces", "three   spaces", "many" + " " * 17 + "spaces", " leading", "   three leading",
        "trailing ", "trailing   ", "  both  ", " ", "  ", " " * 16, " " * 33,
        "tab\tseparated\tvalues", "\tleading tab", "trailing tab\t", "\t\t\t",
        "line one\nline two", "\n", "\n\n", "\nleading newline", "trailing newline\n",
        "para one\n\npara two", "crlf\r\nline", "\r", "mixed \t \n \r\n  \t end", "\u2028line sep\u2029para sep",
        "\n\n\n\n\n\n\n\n\n\n",
        # prompt-like text without special tokens
        "[INST] Describe the image. [/INST]", "[INST]", "[/INST]", "<<SYS>>\nYou are helpful.\n<</SYS>>\n\n",
        "USER: <im_start> hi ASSISTANT:", "<image >", "< image>", "<IMAGE>", "<img>", "</s >", "<s", "s>", "<image",
        "image>", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>",
        # URLs / paths / emails
        "https://huggingface.co/llava-hf/llava-v1.6-mistral-7b-hf/blob/main/tokenizer.json?x=1&y=2#frag",
        "http://example.com:8080/a/b/c.html", "ftp://user:pass@host/path", "user.name+tag@example.co.uk",
        "/usr/lib/python3/site-packages/x.py", "C:\\Windows\\System32\\drivers\\etc\\hosts",
        # very long words
        "Pneumonoultramicroscopicsilicovolcanoconiosis",
        "Pneumonoultramicroscopicsilicovolcanoconiosis" * 20,
        "a" * 1000, "ab" * 400, "9" * 300, "中" * 200, "😀" * 60, "x" * 5000,
        "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft",
        # special-token text (class special_token_text)
        "<s>", "</s>", "<unk>", "<image>", "<pad>", "<image><image>", "<s></s>", "a</s>b", "x <s> y",
        "[INST] <image>\nDescribe the image. [/INST]",
        PROMPT,
        "<image>\nWhat is shown here?",
        "Describe <image> please", "end of text</s>", "  <image>  ", "\n<image>\n", "<pad><pad><pad>",
        "USER: <image>\nWhat is this? ASSISTANT: A cat.</s>",
        "<unk> token", "nested <<image>> brackets", "<s >not special but <s> is",
    ]
    for n in (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 64):
        lines += [f"a{' ' * n}b", f"a{chr(9) * n}b", f"a{chr(10) * n}b", f"{' ' * n}x", f"x{' ' * n}"]
    rng = random.Random(1234)
    alphabet = list(
        "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|\t\n\r  "
        "éàüßñçøæ中文日本語한국어😀🚀ありがとうعربيпривет\u00a0\u200b\u3000▁"
    )
    pieces = ["<s>", "</s>", "<image>", "<pad>", "<unk>", " ", "\n", "hi", "  ", "x y"]
    for i in range(1500):
        k = rng.randint(1, 40)
        lines.append("".join(rng.choice(alphabet) for _ in range(k)))
    for i in range(300):
        k = rng.randint(1, 8)
        lines.append("".join(rng.choice(pieces) for _ in range(k)))
    return lines


CORPUS = build_corpus()


def segmented_sp_ids(sp, text):
    """Documented behaviour of tokenizer.json on text containing special tokens."""
    out = []
    for i, seg in enumerate(SPECIAL_RE.split(text)):
        if i % 2:
            out.append(SPECIAL_IDS[seg])
        elif seg:
            out += sp.encode(seg)
    return out


def classify(sp, text, hf_ids, sp_ids):
    if hf_ids == sp_ids:
        return "identical"
    if SPECIAL_RE.search(text) and hf_ids == segmented_sp_ids(sp, text):
        return "special_token_text"
    return "unexplained"


def test_source_model_sha256():
    assert hashlib.sha256(_sp_model_path().read_bytes()).hexdigest() == SP_SHA256


def test_special_ids_and_sizes(hf, sp):
    assert hf.get_vocab_size(with_added_tokens=True) == 32002
    assert hf.get_vocab_size(with_added_tokens=False) == 32000 == sp.vocab_size()
    for tok, i in SPECIAL_IDS.items():
        assert hf.token_to_id(tok) == i, tok
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert hf.encode("hello").ids[0] == 1  # BOS added
    assert hf.encode("hello").ids[-1] != 2  # no EOS added
    assert hf.encode("").ids == [1]
    assert hf.encode("</s>", add_special_tokens=False).ids == [2]
    assert hf.encode("done</s>", add_special_tokens=False).ids[-1] == 2
    assert hf.encode("<image>", add_special_tokens=False).ids == [32000]
    assert hf.encode("<pad>", add_special_tokens=False).ids == [32001]
    assert hf.encode("a <image> b", add_special_tokens=False).ids.count(32000) == 1
    # sentencepiece has no such tokens: it spells the text out.
    assert 2 not in sp.encode("</s>") and len(sp.encode("<image>")) > 1


def test_tokenizer_json_layout():
    cfg = json.loads(TOK_JSON.read_text(encoding="utf-8"))
    assert cfg["normalizer"] == {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    assert cfg["pre_tokenizer"] is None
    m = cfg["model"]
    assert m["type"] == "BPE" and m["byte_fallback"] is True and m["fuse_unk"] is True
    assert m["unk_token"] == "<unk>" and len(m["vocab"]) == 32000
    assert [d["type"] for d in cfg["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    pp = cfg["post_processor"]
    assert pp["type"] == "TemplateProcessing"
    assert pp["single"] == [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    added = {(t["id"], t["content"]) for t in cfg["added_tokens"]}
    assert added == {(v, k) for k, v in SPECIAL_IDS.items()}
    assert all(t["special"] and not t["normalized"] and not t["lstrip"] and not t["rstrip"] for t in cfg["added_tokens"])


def test_prompt_ids(hf, sp):
    assert hf.encode(PROMPT).ids == PROMPT_IDS
    assert hf.encode(PROMPT[len("<s>"):]).ids == PROMPT_IDS[1:]
    # sentencepiece would give "▁<", "image", ">", "<0x0A>"; tokenizer.json gives "▁", <image>, "▁", "<0x0A>".
    assert sp.encode("[INST] <image>\nWhat is this? [/INST]") != PROMPT_IDS[2:]
    assert hf.encode("<image>\nWhat").tokens == ["<s>", "<image>", "▁", "<0x0A>", "What"]


def test_corpus_matches_sentencepiece_up_to_documented_classes(hf, sp):
    hf_all = [e.ids for e in hf.encode_batch(CORPUS, add_special_tokens=False)]
    counts = Counter()
    for text, hf_ids in zip(CORPUS, hf_all):
        sp_ids = sp.encode(text)
        cls = classify(sp, text, hf_ids, sp_ids)
        assert cls != "unexplained", (text, hf_ids, sp_ids)
        # The class is determined by the text alone: special-token text always differs from
        # sentencepiece (which never emits these ids for text), everything else never differs.
        has_special = bool(SPECIAL_RE.search(text))
        assert cls == ("special_token_text" if has_special else "identical"), (text, hf_ids, sp_ids)
        if has_special:
            assert any(i in SPECIAL_IDS.values() for i in hf_ids)
            assert not any(i in SPECIAL_IDS.values() for i in sp_ids)
        counts[cls] += 1
    n_special = sum(1 for t in CORPUS if SPECIAL_RE.search(t))
    assert counts == Counter(identical=len(CORPUS) - n_special, special_token_text=n_special)
    assert n_special >= 250 and counts["identical"] >= 1700  # both classes well covered


def test_decode_round_trip_plain_text(hf):
    plain = [t for t in CORPUS if not SPECIAL_RE.search(t)]
    encs = hf.encode_batch(plain)  # with BOS
    decoded = hf.decode_batch([e.ids for e in encs], skip_special_tokens=True)
    n_exact = 0
    for text, dec in zip(plain, decoded):
        if "\u2581" in text:
            # A literal U+2581 "▁" in the input is indistinguishable from an encoded space, so it
            # decodes to " " (sentencepiece's decode does the same).
            assert dec == text.replace("\u2581", " ") and dec != text
        else:
            assert dec == text
            n_exact += 1
    assert n_exact >= 1400


def test_regeneration_is_byte_identical(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tokenizer", REPO / "tools" / "make_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "LICENSE"):
        assert (tmp_path / name).read_bytes() == (TOK_DIR / name).read_bytes(), name
