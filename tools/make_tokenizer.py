#!/usr/bin/env python3
"""Regenerate third_party/mistral-7b-tokenizer/{tokenizer.json,tokenizer_config.json,special_tokens_map.json,LICENSE}.

Source: the Mistral-7B sentencepiece model `tokenizer.model.v1` shipped inside the
`mistral-common` PyPI package (mistral_common/data/tokenizer.model.v1).

The conversion mirrors how the llava-hf `llava-v1.6-mistral-7b-hf` tokenizer is built:
  * LlamaTokenizerFast converted from the sentencepiece model with legacy=True
    (bos <s>=1, eos </s>=2, unk <unk>=0, add_bos_token=True, add_eos_token=False);
  * `<image>` added first as a special, non-normalized added token (id 32000);
  * `<pad>` added as the pad token (id 32001).

Usage (from the repo root):
    .venv/bin/python tools/make_tokenizer.py [--out third_party/mistral-7b-tokenizer]

The output is deterministic: running the script twice produces identical bytes.
"""

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

EXPECTED_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
OUT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def sp_model_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).resolve().parent / "data" / "tokenizer.model.v1"


def license_text() -> bytes:
    """Apache-2.0 text shipped in the mistral-common dist-info."""
    from importlib.metadata import distribution

    dist = distribution("mistral_common")
    for f in dist.files or ():
        if f.name == "LICENSE":
            return Path(dist.locate_file(f)).read_bytes()
    raise FileNotFoundError("LICENSE not found in mistral_common dist-info")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(model: Path, workdir: Path):
    from transformers import AddedToken, LlamaTokenizer, LlamaTokenizerFast

    # Step 1: slow sentencepiece LlamaTokenizer, legacy=True, default add_prefix_space (True).
    slow = LlamaTokenizer(
        vocab_file=str(model),
        legacy=True,
        add_bos_token=True,
        add_eos_token=False,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    slow_dir = workdir / "slow"
    slow.save_pretrained(str(slow_dir))
    # Step 2: load it as LlamaTokenizerFast, which runs transformers' LlamaConverter
    # (normalizer Prepend("▁") + Replace(" ", "▁"), BPE with byte_fallback, decoder
    # with Strip(1 leading space)) -- the same layout as the Mistral/llava-hf tokenizer.json.
    # NB: constructing LlamaTokenizerFast(vocab_file=..., from_slow=True) directly passes
    # add_prefix_space=None to the converter, which silently drops the Prepend normalizer.
    tok = LlamaTokenizerFast.from_pretrained(str(slow_dir), legacy=True)
    # As in transformers' convert_llava_next_weights_to_hf.py: <image> first, then <pad>.
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})

    assert len(tok) == 32002, len(tok)
    assert tok.convert_tokens_to_ids("<image>") == 32000
    assert tok.convert_tokens_to_ids("<pad>") == 32001
    assert tok.pad_token_id == 32001
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    return tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", type=Path, default=repo / "third_party" / "mistral-7b-tokenizer")
    args = ap.parse_args(argv)

    model = sp_model_path()
    digest = sha256(model)
    if digest != EXPECTED_SHA256:
        print(f"error: {model} sha256 {digest} != expected {EXPECTED_SHA256}", file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build(model, Path(tmp))
        # legacy_format=False: only tokenizer.json (no tokenizer.model / added_tokens.json copies).
        fast_dir = Path(tmp) / "fast"
        tok.save_pretrained(str(fast_dir), legacy_format=False)
        for name in OUT_FILES:
            src = fast_dir / name
            # Re-serialise JSON with stable key order/indent so the bytes never depend on dict order.
            data = json.loads(src.read_text(encoding="utf-8"))
            text = json.dumps(data, ensure_ascii=False, indent=2, sort_keys=(name != "tokenizer.json"))
            (args.out / name).write_text(text + "\n", encoding="utf-8")

    (args.out / "LICENSE").write_bytes(license_text())

    # Sanity check the shipped tokenizer.json with the raw `tokenizers` library.
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    assert t.get_vocab_size(with_added_tokens=True) == 32002
    assert t.encode("<image>", add_special_tokens=False).ids == [32000]
    norm = json.loads((args.out / "tokenizer.json").read_text(encoding="utf-8"))["normalizer"]
    assert [n["type"] for n in norm["normalizers"]] == ["Prepend", "Replace"], norm
    for name in OUT_FILES + ("LICENSE",):
        print(f"{sha256(args.out / name)}  {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
