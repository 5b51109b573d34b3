"""Text for evaluation and calibration, and tokenization with a model folder's tokenizer.json.

Tokenization uses the `tokenizers` library on the folder's tokenizer.json, which implements the
full pre-tokenizer pipeline (ORT-GenAI's built-in tokenizer skips SmolLM2's digit-splitting rule).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from importlib import resources
from pathlib import Path

import numpy as np

from onnxquant.errors import fail

WIKITEXT_ENV = "ONNXQUANT_WIKITEXT_DIR"
WIKITEXT_TEST_FILE = "wiki.test.raw"
WIKITEXT_CALIB_FILE = "wiki.valid.tokens"

# The embedded copies (onnxquant/embedded_data/, CC BY-SA 3.0, see ATTRIBUTION.md there): each split's
# sha256 after decompression, so a damaged install is an error rather than a different perplexity.
EMBEDDED_SHA256 = {
    WIKITEXT_TEST_FILE: "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    WIKITEXT_CALIB_FILE: "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
}
EMBEDDED_SPLITS = {"test": WIKITEXT_TEST_FILE, "validation": WIKITEXT_CALIB_FILE}


def embedded_bytes(name: str) -> bytes:
    """The decompressed bytes of an embedded WikiText-2 file, checked against its pinned sha256."""
    data = gzip.decompress((resources.files("onnxquant") / "embedded_data" / f"{name}.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != EMBEDDED_SHA256[name]:
        fail(f"the embedded {name} is damaged (sha256 mismatch); reinstall onnxquant or pass a text file")
    return data


def embedded_text(split: str) -> str:
    """WikiText-2's raw test split ("test") or tokenized validation split ("validation"), from the package.

    Newlines are translated as text-mode reading translates them (wiki.test.raw has CRLF line ends),
    so the embedded text equals what `read_text_file` gives for the same file, and so do perplexities.
    """
    text = embedded_bytes(EMBEDDED_SPLITS[split]).decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def resolve_text(path: str | Path | None, dataset: str | None, split: str) -> str:
    """The text a CLI reads: a user's file, else a hub dataset by name, else the embedded WikiText-2 split."""
    if path is not None:
        return read_text_file(path)
    if dataset is not None:
        return load_hub_text(dataset, split)
    return embedded_text(split)


def find_local_wikitext_dir() -> Path | None:
    """A local WikiText-2 folder: $ONNXQUANT_WIKITEXT_DIR, or shared/data/wikitext-2 beside the checkout."""
    env = os.environ.get(WIKITEXT_ENV)
    candidates = [Path(env)] if env else []
    repo_root = Path(__file__).resolve().parent.parent
    candidates += [repo_root.parent / "shared" / "data" / "wikitext-2", Path.cwd().parent / "shared" / "data" / "wikitext-2"]
    for candidate in candidates:
        if (candidate / WIKITEXT_TEST_FILE).is_file():
            return candidate
    return None


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        fail(f"text file {path} does not exist; pass an existing file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a plain text file")
    except OSError as exc:
        fail(f"cannot read {path} ({exc.strerror}); pass a readable text file")
    if not text.strip():
        fail(f"text file {path} is empty; pass a file with text in it")
    if "\x00" in text:
        fail(f"{path} holds NUL bytes, so it is not a text file; pass a plain text file")
    return text


def load_hub_text(dataset: str, split: str) -> str:
    """Load a dataset from the Hugging Face hub with `datasets` (for machines that reach the hub)."""
    try:
        import datasets
    except ImportError:
        fail(f"--dataset {dataset} needs the `datasets` package (pip install 'onnxquant[datasets]'); or pass a local file")
    try:
        if dataset == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            # Each row keeps its trailing newline, so joining with "" reproduces wiki.<split>.raw.
            return "".join(rows["text"])
        if dataset == "pileval":
            rows = datasets.load_dataset("mit-han-lab/pile-val-backup", split="validation")
            return "\n\n".join(rows["text"][:2000])
    except Exception as exc:  # datasets raises many types for an unreachable hub
        fail(f"could not load {dataset} from the Hugging Face hub ({type(exc).__name__}); pass a local text file instead")
    fail(f"unknown dataset {dataset!r}; use wikitext2 or pileval, or pass a local text file")


def load_tokenizer(folder: str | Path):
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        fail(f"cannot read {path} ({exc}); re-export the model or copy a valid tokenizer.json")


def tokenize(folder: str | Path, text: str) -> np.ndarray:
    """Token ids of `text`, without special tokens, as int32."""
    ids = load_tokenizer(folder).encode(text, add_special_tokens=False).ids
    return np.asarray(ids, dtype=np.int32)


def tokenize_prefix(folder: str | Path, text: str, needed: int, chunk_chars: int = 1 << 16) -> np.ndarray:
    """Token ids of the start of `text`, at least `needed` of them when the text has that many.

    Encodes line-aligned chunks one after another and stops early, so memory follows `needed`
    rather than the size of the file (tokenizers keeps offsets and strings for every token).
    """
    tokenizer = load_tokenizer(folder)
    pieces, count, start = [], 0, 0
    while start < len(text) and count < needed:
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        ids = np.asarray(tokenizer.encode(text[start:end], add_special_tokens=False).ids, dtype=np.int32)
        pieces.append(ids)
        count += len(ids)
        start = end
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def cut_windows(ids: np.ndarray, size: int, count: int | None, what: str) -> np.ndarray:
    """Consecutive non-overlapping windows of `size` tokens, shape [n, size]."""
    available = len(ids) // size
    if count is not None and count > available:
        fail(f"the {what} has {len(ids)} tokens, enough for {available} samples of {size}, not {count}; "
             f"give more text or lower the sample count")
    if available == 0:
        fail(f"the {what} has {len(ids)} tokens, fewer than one block of {size}; give a longer text or a smaller block size")
    n = available if count is None else count
    return ids[: n * size].reshape(n, size)


def calibration_windows(folder: str | Path, text: str, count: int, seq_len: int) -> np.ndarray:
    """The first `count` consecutive windows of `seq_len` tokens of `text`, shape [count, seq_len]."""
    ids = tokenize_prefix(folder, text, count * seq_len)
    return cut_windows(ids, seq_len, count, "calibration text")
