"""models/qwen2.py's training forward as a pure function of (params, inputs), for rlsoft.trainer."""
from __future__ import annotations

from flax import nnx


def train_forward(graphdef: nnx.GraphDef):
    """(params, tokens[B,T], positions[B,T], mask[B,T]) -> logits [B,T,V] f32; params = nnx.split state.

    Causal plus padding mask and explicit positions, as the parity tests check against transformers.
    """

    def forward(params, tokens, positions, mask):
        return nnx.merge(graphdef, params)(tokens, positions, mask)

    return forward
