"""Does mixing copy documents (a random sequence repeated, the loss on the repeat) make a small model learn
the recall task sooner? transformers' LlamaForCausalLM (2 layers, hidden 128), a plain loop on CPU, the
recall documents of moba_train.data.synthetic at 64 tokens (2 facts of 1 key and 8 values, the loss on
the values). Prints the answer loss and token accuracy on 256 held-out documents every 250 steps.

    python bench/copy_mix_cpu.py recall|copy25|copy50 SEED STEPS    # docs/quality.md: seeds 0 and 1, 1500

copyNN: NN% of each batch's documents are copy documents: 32 random value-range tokens, then the same 32.
"""

import math
import sys
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moba_train.data.synthetic import SyntheticRecallDataset

VOCAB, SEQ, BATCH = 510, 64, 32  # 169 value ids: a uniform guess scores ln 169 = 5.13 nats


def recall_docs(seed: int, split: int, n: int) -> SyntheticRecallDataset:
    return SyntheticRecallDataset(num_samples=n, seq_length=SEQ, vocab_size=VOCAB, num_facts=2, key_tokens=1,
                                  value_tokens=8, answers_only_loss=True, seed=seed, split=split)


def main(mode: str, seed: int, steps: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    train, held_out = recall_docs(seed, 0, 10**7), recall_docs(1234, 1, 256)
    share = {"recall": 0.0, "copy25": 0.25, "copy50": 0.5}[mode]
    rng = np.random.default_rng(seed)

    def copy_doc():
        half = SEQ // 2
        sequence = rng.integers(0, train.range_size, size=half) + train.value_lo
        mask = np.zeros(SEQ + 1, bool)
        mask[half + 1:] = True
        return np.concatenate([sequence, sequence, [0]]), mask

    def batch(step):
        docs = [copy_doc() if rng.random() < share else train.document(step * BATCH + j) for j in range(BATCH)]
        tokens = torch.tensor(np.stack([d for d, _ in docs]))
        mask = torch.tensor(np.stack([m for _, m in docs]))
        return tokens[:, :-1], tokens[:, 1:], mask[:, 1:].float()

    def answer_loss(logits, labels, mask):
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
        return -(logp * mask).sum() / mask.sum()

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    evaluation = [held_out.document(i) for i in range(256)]
    eval_tokens = torch.tensor(np.stack([d for d, _ in evaluation]))
    eval_mask = torch.tensor(np.stack([m for _, m in evaluation]))[:, 1:].float()
    started = time.time()
    for step in range(steps):
        inputs, labels, mask = batch(step)
        loss = answer_loss(model(inputs).logits, labels, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            with torch.no_grad():
                logits = model(eval_tokens[:, :-1]).logits
                held = answer_loss(logits, eval_tokens[:, 1:], eval_mask).item()
                hits = (logits.argmax(-1) == eval_tokens[:, 1:]).float()
                accuracy = ((hits * eval_mask).sum() / eval_mask.sum()).item()
            print(f"{mode} seed {seed} step {step + 1} answer loss {held:.3f} token acc {accuracy:.3f} "
                  f"({time.time() - started:.0f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0, int(sys.argv[3]) if len(sys.argv) > 3 else 1500)
