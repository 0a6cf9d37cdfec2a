"""The thinking-token testbed's training step in PyTorch, written the way the original does it
(ekhadley/think_tokens, the `add_think_fixed_blind_super_split` arithmetic scripts): the reference
side of a JAX-vs-torch benchmark.

    python -m benchmarks.think_torch                  # default config, 10 s of steps
    python -m benchmarks.think_torch --seconds=3 --modulus=10

One step, as the original's loop body: sample T thoughts for B*G rows with a Python loop over
positions (the thinker re-run on the whole growing sequence each position, no KV cache), score them
with the blind answerer under inference mode, whiten the rewards per group, then one
zero_grad/backward/step for the thinker (policy gradient + entropy bonus) and one for the answerer
(cross-entropy on the hand-made "super" thoughts: the answer's base-10 digits). Two deliberate
departures from the original, both from the brief: pre-LN GELU blocks (the original is post-LN
ReLU) and one joint vocabulary for both models (the split original gives each model its own).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch as t
from torch import nn
from torch.nn import functional as F

from benchmarks import timing
from rlsoft.config import check, check_finite, parse_flags


@dataclasses.dataclass(frozen=True)
class TorchThinkConfig:
    modulus: int = 100  # M: numbers are ids [0, M), the answer is the operands' sum mod M
    n_operands: int = 2
    n_thoughts: int = 10  # V: thought ids [M, M + V); M + V = end-of-thought (unused), M + V + 1 = ASK
    think_len: int = 2  # T: fixed number of thoughts, no end-of-thought
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    batch_size: int = 64  # B questions per step
    group_size: int = 32  # G thoughts sampled per question
    lr: float = 1e-3
    weight_decay: float = 0.0
    entropy_coef: float = 0.01
    threads: int = 0  # torch.set_num_threads; 0: all cores, as benchmarks/torch_update.py

    def __post_init__(self):
        check(self.modulus >= 2 and self.n_operands >= 1, "need modulus >= 2 and n_operands >= 1")
        # The hand-made thoughts are the answer's base-10 digits, one thought per digit.
        check(self.n_thoughts >= 10, f"n_thoughts={self.n_thoughts} is invalid; need >= 10 (digit thoughts)")
        check(self.think_len >= n_digits(self.modulus),
              f"think_len={self.think_len} is invalid; need >= {n_digits(self.modulus)} (digits of modulus - 1)")
        check(self.d_model % self.n_heads == 0, "d_model must be a multiple of n_heads")
        check(min(self.d_model, self.n_layers, self.batch_size, self.group_size) >= 1, "sizes must be >= 1")
        check(self.group_size >= 2, "group_size must be >= 2 (per-group whitening)")
        check_finite(self.lr > 0, "lr", self.lr, "> 0")
        check(self.threads >= 0, "threads must be >= 0")

    @property
    def vocab(self) -> int:  # numbers, thoughts, end-of-thought, ASK
        return self.modulus + self.n_thoughts + 2

    @property
    def ask(self) -> int:
        return self.modulus + self.n_thoughts + 1


def n_digits(modulus: int) -> int:
    return len(str(modulus - 1))


class Block(nn.Module):
    """Pre-LN GPT-2 block. nn.MultiheadAttention as the original; need_weights=False so torch may
    take its fused attention path (the averaged attention map was never used)."""

    def __init__(self, cfg: TorchThinkConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        d = cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: t.Tensor, mask: t.Tensor) -> t.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Learned token and position embeddings, pre-LN blocks, final LN, untied unembedding."""

    def __init__(self, cfg: TorchThinkConfig, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(seq_len, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, toks: t.Tensor) -> t.Tensor:
        n = toks.shape[1]
        # The original rebuilds the causal mask every call; so do we (it is part of its cost).
        mask = t.triu(t.ones((n, n), dtype=t.bool), diagonal=1)
        x = self.embed(toks) + self.pos_embed(t.arange(n)).unsqueeze(0)
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(self.ln_f(x))


class TorchThinkStep:
    """`step()` runs one full training step and returns (thinker_loss, answerer_loss) as floats."""

    def __init__(self, cfg: TorchThinkConfig = TorchThinkConfig(), seed: int = 0):
        t.set_num_threads(cfg.threads or os.cpu_count() or 1)
        self.cfg = cfg
        t.manual_seed(seed)  # weight init
        self.gen = t.Generator().manual_seed(seed)  # questions and sampled thoughts
        self.thinker = GPT(cfg, cfg.n_operands + cfg.think_len).train()
        self.answerer = GPT(cfg, cfg.think_len + 1).train()  # thoughts + ASK
        self.think_opt = t.optim.AdamW(self.thinker.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.answer_opt = t.optim.AdamW(self.answerer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Place values for the hand-made thoughts: 100 -> [10, 1] (leading zeros pad to think_len).
        self.place = 10 ** t.arange(cfg.think_len - 1, -1, -1)

    def questions(self) -> tuple[t.Tensor, t.Tensor]:
        """(B, n_operands) operand tokens and (B,) answers, fresh every step."""
        cfg = self.cfg
        q = t.randint(0, cfg.modulus, (cfg.batch_size, cfg.n_operands), generator=self.gen)
        return q, q.sum(-1) % cfg.modulus

    def hand_made(self, ans: t.Tensor) -> t.Tensor:
        """The "super" thoughts: the answer's base-10 digits as thought ids, (B,) -> (B, T)."""
        return (ans.unsqueeze(-1) // self.place) % 10 + self.cfg.modulus

    def answer_logprobs(self, thoughts: t.Tensor) -> t.Tensor:
        """Blind answerer: log p(number | thoughts, ASK), read at the last position over [0, M)."""
        ask = t.full((thoughts.shape[0], 1), self.cfg.ask)
        logits = self.answerer(t.cat([thoughts, ask], dim=1))
        return t.log_softmax(logits[:, -1, :self.cfg.modulus], dim=-1)

    def thought_logprobs(self, logits: t.Tensor) -> t.Tensor:
        m = self.cfg.modulus
        return t.log_softmax(logits[..., m:m + self.cfg.n_thoughts], dim=-1)

    def rollout(self, q_toks: t.Tensor, ans: t.Tensor) -> tuple[t.Tensor, t.Tensor]:
        """(B*G, n_operands + T) sampled sequences, row b * G + g for question b, and their (B*G,)
        whitened weights; both inference tensors."""
        cfg, m, q_len = self.cfg, self.cfg.modulus, self.cfg.n_operands
        rows = cfg.batch_size * cfg.group_size
        q_rep = q_toks.repeat_interleave(cfg.group_size, dim=0)
        ans_rep = ans.repeat_interleave(cfg.group_size)
        with t.inference_mode():  # rollouts and rewards, no graph
            rollouts = q_rep
            for _ in range(cfg.think_len):  # no KV cache: the whole sequence again each position
                probs = self.thought_logprobs(self.thinker(rollouts)[:, -1]).exp()
                think_toks = t.multinomial(probs, 1, generator=self.gen) + m
                rollouts = t.cat([rollouts, think_toks], dim=1)
            rewards = self.answer_logprobs(rollouts[:, q_len:])[t.arange(rows), ans_rep]
            r = rewards.view(cfg.batch_size, cfg.group_size)
            # Population std, as rlsoft.weighting's GRPO whitening.
            weights = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, correction=0, keepdim=True) + 1e-8)).flatten()
        return rollouts, weights

    def __call__(self) -> tuple[float, float]:
        cfg, m, q_len = self.cfg, self.cfg.modulus, self.cfg.n_operands
        q_toks, ans = self.questions()
        rollouts, weights = self.rollout(q_toks, ans)
        # Out of inference mode: clones are ordinary tensors that autograd may save.
        rollouts, weights = rollouts.clone(), weights.clone()
        logits = self.thinker(rollouts)[:, q_len - 1:-1]  # the positions that predicted each thought
        think_logprobs = self.thought_logprobs(logits)  # (rows, T, V)
        action_logprobs = think_logprobs.gather(-1, (rollouts[:, q_len:] - m).unsqueeze(-1)).squeeze(-1)
        entropy = -(think_logprobs * think_logprobs.exp()).sum(-1).mean()
        think_loss = -(weights * action_logprobs.sum(-1)).mean() - cfg.entropy_coef * entropy
        self.think_opt.zero_grad()
        think_loss.backward()
        self.think_opt.step()

        # "super": the answerer learns from the hand-made digit thoughts, not from what was sampled.
        answer_loss = F.nll_loss(self.answer_logprobs(self.hand_made(ans)), ans)  # cross-entropy over [0, M)
        self.answer_opt.zero_grad()
        answer_loss.backward()
        self.answer_opt.step()
        return think_loss.item(), answer_loss.item()  # the original logs every step: the sync is part of the cost

    @t.no_grad()
    def answer_ce(self) -> float:
        """The answerer's mean CE over every answer given its hand-made thoughts (a learning check)."""
        ans = t.arange(self.cfg.modulus)
        return float(F.nll_loss(self.answer_logprobs(self.hand_made(ans)), ans))


def steps_per_second(cfg: TorchThinkConfig = TorchThinkConfig(), seconds: float = 10.0, seed: int = 0) -> dict:
    """Steps per second over `seconds` of back-to-back steps, after one warm-up step (timing.first_calls).
    Returns the rate, the warm-up seconds and the per-step seconds (median, min)."""
    step = TorchThinkStep(cfg, seed)
    _, first = timing.first_calls({"torch": step})
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        times.extend(timing.interleaved({"torch": step}, 1)["torch"])
    times.sort()
    return {"steps_per_s": len(times) / sum(times), "first_s": first["torch"], "steps": len(times),
            "median_s": times[len(times) // 2], "min_s": times[0]}


@dataclasses.dataclass(frozen=True)
class BenchConfig(TorchThinkConfig):
    seconds: float = 10.0
    seed: int = 0


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog="python -m benchmarks.think_torch")
    think = TorchThinkConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TorchThinkConfig)})
    figures = steps_per_second(think, cfg.seconds, cfg.seed)
    figures = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    figures.update(torch=t.__version__, threads=t.get_num_threads(), loadavg=os.getloadavg()[0],
                   workload=dict(B=think.batch_size, G=think.group_size, T=think.think_len, M=think.modulus))
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
