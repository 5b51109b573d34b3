"""Greedy generation through ONNX Runtime GenAI, the "does it still talk"
check of a quantized folder.

The prompt goes through the folder's chat template (ORT-GenAI's `apply_chat_template`) and is tokenized
with the folder's tokenizer.json, as the validator does. With `--compare OTHER`, OTHER answers the same
prompt and the two outputs are printed one after the other, followed by how far they agree:
- identical_prefix: greedy tokens the two produced before their first difference;
- agreement: the share of the first model's generated tokens that OTHER also ranks first when it reads
  the first model's text (teacher forcing), which keeps counting after a single early difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from onnxquant.data import load_tokenizer
from onnxquant.errors import fail
from onnxquant.evaluation import GenAIBackend
from onnxquant.genai_folder import GenAIFolder

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."


@dataclass(frozen=True)
class Generation:
    prompt_ids: np.ndarray
    new_ids: np.ndarray
    text: str


class GreedyGenerator:
    """One ORT-GenAI model: greedy continuations and teacher-forced next-token choices."""

    def __init__(self, folder: GenAIFolder):
        import onnxruntime_genai as og

        self._og = og
        self.folder = folder
        self.backend = GenAIBackend(folder)
        self.tokenizer = load_tokenizer(folder.path)
        self.eos = set(np.atleast_1d(folder.config["model"].get("eos_token_id", [])).tolist())

    def prompt_ids(self, prompt: str, chat: bool) -> np.ndarray:
        text = prompt
        if chat:
            template = self._og.Tokenizer(self.backend.model)
            try:
                text = template.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True)
            except Exception as exc:  # ORT-GenAI raises RuntimeError for a folder without a usable template
                fail(f"{self.folder.path} has no usable chat template ({exc}); pass --no_chat_template")
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def generate(self, prompt_ids: np.ndarray, max_new_tokens: int) -> Generation:
        og = self._og
        params = og.GeneratorParams(self.backend.model)
        params.set_search_options(do_sample=False, max_length=self.folder.kv_capacity(len(prompt_ids) + max_new_tokens))
        generator = og.Generator(self.backend.model, params)
        generator.append_tokens(prompt_ids.reshape(1, -1))
        new_ids: list[int] = []
        while not generator.is_done() and len(new_ids) < max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            new_ids.append(token)
            if token in self.eos:
                break
        ids = np.asarray(new_ids, dtype=np.int32)
        return Generation(prompt_ids, ids, self.tokenizer.decode(ids.tolist(), skip_special_tokens=True))

    def forced_choices(self, prompt_ids: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
        """This model's top-1 token at each position of `new_ids`, reading prompt + new_ids."""
        sequence = np.concatenate([prompt_ids, new_ids])
        logits = self.backend.logits(sequence)
        return logits[len(prompt_ids) - 1: len(sequence) - 1].argmax(axis=-1)


@dataclass(frozen=True)
class Agreement:
    tokens: int
    identical_prefix: int
    forced_matches: int

    @property
    def share(self) -> float:
        return self.forced_matches / self.tokens if self.tokens else 1.0

    def summary(self) -> str:
        return (f"tokens={self.tokens} identical_prefix={self.identical_prefix} "
                f"agreement={self.share:.3f} ({self.forced_matches}/{self.tokens})")


def compare(reference: Generation, other: Generation, other_model: GreedyGenerator) -> Agreement:
    a, b = reference.new_ids, other.new_ids
    common = min(len(a), len(b))
    differs = np.flatnonzero(a[:common] != b[:common])
    prefix = int(differs[0]) if len(differs) else common
    forced = other_model.forced_choices(reference.prompt_ids, a) if len(a) else np.zeros(0, dtype=np.int64)
    return Agreement(len(a), prefix, int((forced == a).sum()))
