"""Generate from a Hugging Face Llama with MoBA attention (as the original MoBA release's example).

    python examples/llama.py --model PATH --attn moba --block-size 4096 --topk 12 --prompt "how are you?"
    python examples/llama.py --model PATH --attn full        # transformers' SDPA attention, for comparison

PATH is a Hugging Face Llama directory with its tokenizer (e.g. one written by
`scripts/convert_hf.py export`). The prompt is prefilled with MoBA; the generated tokens attend to
the KV cache with full attention (see moba_train/hf.py). Greedy decoding; bf16 on CUDA, fp32 on CPU.
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moba_train.hf import register_moba

ATTENTION = {"moba": "moba", "moba_naive": "moba_naive", "full": "sdpa"}


def generate(model_path: str, attn: str, prompt: str, block_size: int, topk: int, max_new_tokens: int) -> str:
    """The prompt followed by its greedy continuation, decoded to text."""
    register_moba(block_size=block_size, topk=topk)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=ATTENTION[attn])
    model = model.to(device).eval()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0].tolist())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hugging Face Llama directory (weights + tokenizer)")
    parser.add_argument("--attn", choices=sorted(ATTENTION), default="moba")
    parser.add_argument("--block-size", type=int, default=4096, help="MoBA key block size in tokens")
    parser.add_argument("--topk", type=int, default=12, help="MoBA blocks per query, counting its own")
    parser.add_argument("--prompt", default="how are you?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    print(generate(args.model, args.attn, args.prompt, args.block_size, args.topk, args.max_new_tokens))


if __name__ == "__main__":
    main(sys.argv[1:])
