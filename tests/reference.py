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


# -- decoding ---------------------------------------------------------------------------------
def window_forward(sd, cfg, tokens, start, kvs):
    """`tokens` at absolute `start` attending to every position of `kvs` (per-layer K/V) with
    their own fresh K/V over start..start+T; returns logits and the K/V with those written in."""
    x = sd["model.embed_tokens.weight"][tokens]
    T = tokens.shape[1]
    pos = torch.arange(start, start + T)
    new = []
    for i in range(cfg.num_hidden_layers):
        q, k, v = qkv(sd, i, x, pos, cfg)
        K, V = kvs[i][0].clone(), kvs[i][1].clone()
        K[:, :, start:start + T], V[:, :, start:start + T] = k, v
        new.append((K, V))
        x = attend_and_mlp(sd, i, x, q, K, V, torch.ones(T, K.shape[2], dtype=torch.bool), cfg)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return rms(x, sd["model.norm.weight"], cfg.rms_norm_eps) @ head.T, new


def decode(sd, cfg, prompt, dec, num_blocks=None):
    """Greedy block-diffusion decoding of one prompt, every layer computed, written from the
    facts doc with the functions above: no engine code, no reuse code, no caches but the
    block's K/V (which small-block forwards attend to and overwrite in their window).

    `dec` is a DecodeConfig (read as plain fields); `num_blocks` defaults to the engine's
    budget for this prompt alone. Returns the generated tokens up to and including the stop.
    """
    bs, sbs, mask_id = dec.block_size, dec.small_block_size, dec.mask_id
    n = len(prompt)
    num_blocks = num_blocks or max(dec.max_new_tokens // bs, 1) + n // bs
    x = torch.full((1, num_blocks * bs + 1), mask_id, dtype=torch.long)
    x[0, :n] = torch.tensor(prompt)

    def pick(logits):  # the mask token is never a prediction
        logits = logits.float().clone()
        logits[..., mask_id] = -float("inf")
        return logits

    finished = False
    if n >= bs and n % bs == 0:  # a prompt of whole blocks takes one autoregressive step
        logits, _ = full_sequence(sd, cfg, x[:, :n], bs)
        x[0, n] = pick(logits[0, n - 1]).argmax()
        finished = int(x[0, n]) == dec.stop_id
    for block in range(n // bs, num_blocks):
        if finished:
            break
        lo, hi = block * bs, (block + 1) * bs
        kvs = None
        for start in range(0, bs, sbs):
            window = slice(lo + start, lo + start + sbs)
            while bool((x[0, window] == mask_id).any()):
                if not dec.use_block_cache or kvs is None or int(x[0, lo + start]) == mask_id:
                    logits, kvs = full_sequence(sd, cfg, x[:, :hi], bs)
                    # block position p is predicted at p - 1 (the block's first by itself)
                    logits = logits[0, [lo + max(p - 1, 0) for p in range(start, start + sbs)]]
                else:
                    logits, kvs = window_forward(sd, cfg, x[:, window], lo + start, kvs)
                    logits = logits[0, [max(p - 1, 0) for p in range(sbs)]]  # shifted inside the window
                probs = torch.softmax(pick(logits), -1)
                conf, token = probs.max(-1)
                masked = x[0, window] == mask_id
                conf = torch.where(masked, conf, torch.full_like(conf, -float("inf")))
                chosen = (conf > dec.threshold) | (torch.arange(sbs) == conf.argmax())
                chosen &= masked
                x[0, window] = torch.where(chosen, token, x[0, window])
                finished |= bool(((token == dec.stop_id) & chosen).any())
        if finished:
            break
        logits, _ = full_sequence(sd, cfg, x[:, :hi], bs)
        x[0, hi] = pick(logits[0, hi - 1]).argmax()
        finished = int(x[0, hi]) == dec.stop_id
    out = []
    for t in x[0, n:].tolist():
        if t == mask_id:
            break
        out.append(t)
        if t == dec.stop_id:
            break
    return out
