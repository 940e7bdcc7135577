"""Causal softmax attention, full or restricted to a sliding window (docs/design.md#the-language-model).

With a window W a token attends to itself and the W previous tokens (W + 1 keys). The window
variant runs over query blocks, each against only the keys its window can reach, so memory is
O(T·(block + W)) and not O(T²).
"""
import torch
import torch.nn.functional as F

QUERY_BLOCK = 512  # queries per block of the sliding-window path


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     window: int | None = None, query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v over allowed keys; q, k, v [B, H, T, d] (RoPE applied)."""
    T = q.shape[2]
    if window is None or window >= T - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    outputs = []
    for start in range(0, T, query_block):
        stop = min(start + query_block, T)
        key_start = max(0, start - window)
        query_pos = torch.arange(start, stop, device=q.device).unsqueeze(-1)
        key_pos = torch.arange(key_start, stop, device=q.device)
        allowed = (key_pos <= query_pos) & (query_pos - key_pos <= window)
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, key_start:stop], v[:, :, key_start:stop], attn_mask=allowed))
    return torch.cat(outputs, dim=2)
