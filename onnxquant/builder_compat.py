"""Runs the ORT-GenAI model builder with one adaptation for transformers 5 (the export's child process:
`python -m onnxquant.builder_compat <builder arguments>`).

transformers 5 stores Gemma 3's RoPE settings per layer type (`rope_parameters = {"full_attention":
{...}, "sliding_attention": {...}}`); the builder (0.18) reads a flat `rope_parameters["rope_type"]`
and a `rope_local_base_freq`, as transformers 4 wrote them, and fails with KeyError 'rope_type'.
The config is given back in that older form: the global layers' parameters as `rope_parameters`
and the sliding layers' theta as `rope_local_base_freq`. Nothing else in the builder changes, and
a config without per-layer-type RoPE passes through untouched.
"""

from __future__ import annotations

import runpy
import sys

BUILDER_MODULE = "onnxruntime_genai.models.builder"


def flatten_layer_type_rope(config):
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
        config.rope_theta = config.rope_parameters["rope_theta"]
    return config


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        return flatten_layer_type_rope(load(*args, **kwargs))

    AutoConfig.from_pretrained = from_pretrained
    sys.argv[0] = BUILDER_MODULE
    runpy.run_module(BUILDER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
