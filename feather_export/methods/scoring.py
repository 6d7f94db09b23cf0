"""Pruning scores of docs/design.md §4 computed with the model's own torch modules, in fp32.

Each function returns a float32 tensor of shape [n] with one score per current image token.
"""
from __future__ import annotations


def _heads(x, num_heads: int):
    """[..., S, H*hd] -> [H, S, hd] (batch 1)."""
    s = x.shape[-2]
    return x.reshape(s, num_heads, -1).transpose(0, 1)


def _mean_head_probs(q, k, num_kv_groups: int):
    """Softmax over keys of q.k/sqrt(hd) per head, mean over heads.

    q: [H, 1, hd]; k: [Hkv, n, hd] (key heads repeated like transformers' ``repeat_kv``).
    """
    import torch

    k = torch.repeat_interleave(k, num_kv_groups, dim=0)
    logits = (q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    return torch.softmax(logits.float(), dim=-1).mean(dim=0)[0]


def _qk(layer, hidden_in):
    """input_layernorm, q_proj, k_proj of a Llama layer; q for the last position only."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in.float())[0]            # [S, d]
    q = _heads(attn.q_proj(x[-1:]), attn.config.num_attention_heads)
    k = _heads(attn.k_proj(x), attn.config.num_key_value_heads)
    return q, k, attn.num_key_value_groups


def feather_scores(layer, hidden_in, image_start: int, num_image: int):
    """FEATHER: last-token attention over the image keys, *without* rotary embedding."""
    q, k, groups = _qk(layer, hidden_in)
    return _mean_head_probs(q, k[:, image_start:image_start + num_image], groups)


def _rope(rotary, hidden_in, position_ids, q, k):
    """RoPE on the last position's query and on every key, as the layer applies it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = rotary(hidden_in.float(), position_ids)         # [1, S, hd]
    cos, sin = cos[0], sin[0]                                  # [S, hd], broadcast over heads
    q, _ = apply_rotary_pos_emb(q, q, cos[-1:], sin[-1:], unsqueeze_dim=0)
    _, k = apply_rotary_pos_emb(k, k, cos, sin, unsqueeze_dim=0)
    return q, k


def fastv_scores(layer, rotary, hidden_in, position_ids, image_start: int, num_image: int):
    """FastV: last-token attention with RoPE over all keys of its causal row, image columns."""
    q, k, groups = _qk(layer, hidden_in)
    q, k = _rope(rotary, hidden_in, position_ids, q, k)
    probs = _mean_head_probs(q, k, groups)
    return probs[image_start:image_start + num_image]


def btp_logits(layer, rotary, hidden_in, position_ids, image_start: int, num_image: int):
    """BTP: the last token's *pre-softmax* logits q.k/sqrt(hd) with RoPE, mean over heads, image
    columns (one query row, as fused attention computes it)."""
    import torch

    q, k, groups = _qk(layer, hidden_in)
    q, k = _rope(rotary, hidden_in, position_ids, q, k)
    k = torch.repeat_interleave(k[:, image_start:image_start + num_image], groups, dim=0)
    logits = (q.float() @ k.float().transpose(1, 2)) * q.shape[-1] ** -0.5     # [H, 1, n]
    return logits.mean(dim=0)[0]


def score_inputs(layer, rotary, hidden_in, position_ids, criterion: str):
    """What an exported span hands its select segment, in the segment layout.

    Returns (query [1, 1, H, hd], keys heads-first [1, Hkv, S, hd]): FEATHER without RoPE, FastV
    and BTP with it.
    """
    q, k, _ = _qk(layer, hidden_in)
    if criterion in ("fastv", "btp"):
        q, k = _rope(rotary, hidden_in, position_ids, q, k)
    return q.transpose(0, 1)[None], k[None]


def fastervlm_scores(vision_layer, hidden_in, cls_token: bool, keep_cls: bool = False):
    """FasterVLM in a vision layer (docs/design.md §4). With a CLS token (CLIP): the CLS query's
    attention over CLS + patches, mean over heads, image-token columns only: the patches under
    strategy ``default``; every column under ``full``, where the CLS is an image token (its score
    is its attention to itself). Without (SigLIP): the attention each patch receives, mean over
    heads and over all queries."""
    attn = vision_layer.self_attn
    x = vision_layer.layer_norm1(hidden_in.float())[0]          # [T, d]
    k = _heads(attn.k_proj(x), attn.num_heads)
    if cls_token:
        q = _heads(attn.q_proj(x[:1]), attn.num_heads)
        probs = _mean_head_probs(q, k, 1)
        return probs if keep_cls else probs[1:]
    import torch

    q = _heads(attn.q_proj(x), attn.num_heads)                  # [H, T, hd]
    logits = (q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    return torch.softmax(logits.float(), dim=-1).mean(dim=(0, 1))
