"""The RL update of benchmarks.train_step in PyTorch: transformers' Qwen2ForCausalLM, the same batch,
weights, loss, micro-batches, clipping and AdamW as the JAX update (see that module's docstring)."""
from __future__ import annotations

import os

import numpy as np

from rlsoft import trainer


def torch_update_fn(model_dir: str, batch: trainer.Batch, weights: np.ndarray, m: int, lr: float):
    """The same update in PyTorch: returns (run() -> pre-clip grad norm, attention implementation)."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    p = batch.prompts.shape[1]
    mask = np.concatenate([batch.prompt_mask, batch.response_mask], 1)
    ids = torch.tensor(np.concatenate([batch.prompts, batch.responses], 1), dtype=torch.long)
    am = torch.tensor(mask, dtype=torch.long)
    pos = torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0), dtype=torch.long)
    targets = torch.tensor(batch.responses, dtype=torch.long)
    rmask = torch.tensor(batch.response_mask, dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)
    total = rmask.sum().clamp(min=1.0)
    rows = ids.shape[0] // m

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        for i in range(m):
            s = slice(i * rows, (i + 1) * rows)
            logits = model(input_ids=ids[s], attention_mask=am[s], position_ids=pos[s]).logits[:, p - 1:-1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[s, :, None])[..., 0]
            loss = -(w[s, None] * logp * rmask[s]).sum() / total  # token_mean over the whole batch
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(norm)

    return run, model.config._attn_implementation


def with_threads(fn, k: int):
    """`fn` run with torch.set_num_threads(k), all cores restored after."""
    import torch

    def run():
        torch.set_num_threads(k)
        try:
            return fn()
        finally:
            torch.set_num_threads(os.cpu_count() or 1)
    return run
