"""Naive fp64 references for the bpt ops: the obvious math, materialising everything."""

import math

import torch
import torch.nn.functional as F


def attention(q, k, v, causal, segment_ids=None, scale=None, kv_offset=0):
    """Softmax attention in fp64 with an explicit [T, S] mask. Returns (out, lse)."""
    q, k, v = (t.double() for t in (q, k, v))
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(D))
    q_pos = torch.arange(T) + kv_offset
    k_pos = torch.arange(S)
    visible = torch.ones(B, 1, T, S, dtype=torch.bool)
    if causal:
        visible &= (k_pos[None, :] <= q_pos[:, None])[None, None]
    if segment_ids is not None:
        visible &= (segment_ids[:, q_pos][:, :, None] == segment_ids[:, None, :])[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def swiglu(x, w_gate, w_up, w_down):
    x, w_gate, w_up, w_down = (t.double() for t in (x, w_gate, w_up, w_down))
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def lm_loss(h, w_head, targets, ignore_index=-100, z_loss=0.0):
    """(mean CE + z_loss * mean lse^2 over counted tokens, n_tokens, n_correct), fp64."""
    logits = (h.double() @ w_head.double().T).reshape(-1, w_head.shape[0])
    t = targets.reshape(-1)
    valid = t != ignore_index
    lse = torch.logsumexp(logits, -1)
    n = int(valid.sum())
    if n == 0:
        return logits.sum() * 0, 0, 0
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index) + z_loss * (lse[valid] ** 2).mean()
    return loss, n, int(((logits.argmax(-1) == t) & valid).sum())


def activation_quant(x):
    """BitNet b1.58: per token, absmax to int8 levels, dequantized."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def weight_quant(w):
    """BitNet b1.58: per tensor, absmean to {-1, 0, 1}, dequantized."""
    scale = w.abs().mean().clamp(min=1e-5)
    return (w / scale).round().clamp(-1, 1) * scale

