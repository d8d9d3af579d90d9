"""A plain Qwen2 forward written from the facts doc, independent of reuse_exp.engine.model.

No caches, explicit masks, one function per piece: the oracle for the engine's
cached forward kinds. `layer_kv` lets a test build keys from other hidden states
(the small-block forward attends to K/V computed by an earlier full-block forward).
"""
import math

import torch


def rms(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    rot = torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
    return x * cos + rot * sin


def qkv(sd, i, x, pos, cfg):
    p = f"model.layers.{i}."
    h = rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
    B, T, _ = h.shape
    D = cfg.head_dim
    q = (h @ sd[p + "self_attn.q_proj.weight"].T + sd[p + "self_attn.q_proj.bias"]).view(B, T, -1, D).transpose(1, 2)
    k = (h @ sd[p + "self_attn.k_proj.weight"].T + sd[p + "self_attn.k_proj.bias"]).view(B, T, -1, D).transpose(1, 2)
    v = (h @ sd[p + "self_attn.v_proj.weight"].T + sd[p + "self_attn.v_proj.bias"]).view(B, T, -1, D).transpose(1, 2)
    return rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta), v


def attend_and_mlp(sd, i, x, q, k, v, allowed, cfg):
    p = f"model.layers.{i}."
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    att = torch.softmax(scores, -1) @ v
    B, _, T, _ = att.shape
    h = x + att.transpose(1, 2).reshape(B, T, -1) @ sd[p + "self_attn.o_proj.weight"].T
    m = rms(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    act = torch.nn.functional.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)
    return h + act @ sd[p + "mlp.down_proj.weight"].T


def block_causal(n_q, q_start, n_k, bs):
    qi = torch.arange(q_start, q_start + n_q)[:, None] // bs
    ki = torch.arange(n_k)[None] // bs
    return qi >= ki


def full_sequence(sd, cfg, tokens, bs):
    """Logits for every position of `tokens` under the block-causal mask; also per-layer K/V."""
    x = sd["model.embed_tokens.weight"][tokens]
    pos = torch.arange(tokens.shape[1])
    allowed = block_causal(tokens.shape[1], 0, tokens.shape[1], bs)
    kvs = []
    for i in range(cfg.num_hidden_layers):
        q, k, v = qkv(sd, i, x, pos, cfg)
        kvs.append((k, v))
        x = attend_and_mlp(sd, i, x, q, k, v, allowed, cfg)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return rms(x, sd["model.norm.weight"], cfg.rms_norm_eps) @ head.T, kvs


def small_block(sd, cfg, tokens8, start, kvs):
    """An 8-token window at absolute `start` attending to `kvs` (per-layer K/V, all
    visible) with its own fresh K/V written over positions start..start+7."""
    x = sd["model.embed_tokens.weight"][tokens8]
    T = tokens8.shape[1]
    pos = torch.arange(start, start + T)
    for i in range(cfg.num_hidden_layers):
        q, k, v = qkv(sd, i, x, pos, cfg)
        K, V = kvs[i][0].clone(), kvs[i][1].clone()
        K[:, :, start:start + T], V[:, :, start:start + T] = k, v
        allowed = torch.ones(T, K.shape[2], dtype=torch.bool)
        x = attend_and_mlp(sd, i, x, q, K, V, allowed, cfg)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return rms(x, sd["model.norm.weight"], cfg.rms_norm_eps) @ head.T
