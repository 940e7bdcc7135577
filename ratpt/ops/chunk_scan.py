"""Gated linear recurrence, reset at chunk starts (docs/design.md#the-chunked-gated-recurrence, the "R" of RAT).

    y[t] = g[t] * y[t-1] + (1 - g[t]) * x[t],   y[-1] = 0 and y[t-1] := 0 at every chunk start

With one chunk covering the whole sequence this is the RNN layer's recurrence; `reset_scan` resets it at
given positions instead (the RNN layer over packed documents).

The recurrence is computed without a Python loop over T: the sequence is cut into blocks of
`BLOCK` positions, a loop over those positions runs vectorised across all blocks, and the state
carried from one block into the next is itself a linear recurrence over T/BLOCK block-end values,
solved the same way (recursively). The loop count is BLOCK * log_BLOCK(T): 16 steps for RAT's
chunks, ~80 for an RNN over 100K tokens. Everything runs in at least float32 (the gate is fp32
by design); the output has the dtype of x.
"""
import torch
import torch.nn.functional as F

BLOCK = 16  # positions per block of the hierarchical scan


def forget_gate(f: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    """g = sigmoid(f + gate_bias) in at least fp32 (docs/design.md#shapes-and-projections: fp32 even under bf16)."""
    dtype = torch.promote_types(torch.promote_types(f.dtype, gate_bias.dtype), torch.float32)
    return torch.sigmoid(f.to(dtype) + gate_bias.to(dtype))


def chunk_scan(x: torch.Tensor, g: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Gated recurrence of x [B, T, D] with gate g [B, T, D] in (0, 1), reset every chunk_size.

    chunk_size=None means one chunk (no reset): the RNN layer. T need not be a multiple of
    chunk_size; the last chunk is then partial.
    """
    g, u = _gate_and_input(x, g)
    if chunk_size is None or chunk_size >= x.shape[1]:
        return linear_scan(g, u).to(x.dtype)
    B, T, D = x.shape
    pad = -T % chunk_size
    g, u = (F.pad(t, (0, 0, 0, pad)) for t in (g, u))
    n_chunks = (T + pad) // chunk_size
    y = linear_scan(g.view(B * n_chunks, chunk_size, D), u.view(B * n_chunks, chunk_size, D))
    return y.view(B, T + pad, D)[:, :T].to(x.dtype)


def reset_scan(x: torch.Tensor, g: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """The recurrence of chunk_scan with the state reset wherever `reset` [B, T] is True (each document's
    first token) rather than every chunk_size: there the carried state's factor g is 0."""
    g, u = _gate_and_input(x, g)
    return linear_scan(g.masked_fill(reset.unsqueeze(-1), 0), u).to(x.dtype)


def _gate_and_input(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g and u = (1 − g)·x in the compute dtype (at least fp32)."""
    compute = torch.promote_types(torch.promote_types(x.dtype, g.dtype), torch.float32)
    g = g.to(compute)
    return g, (1 - g) * x.to(compute)


def linear_scan(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y[t] = a[t] * y[t-1] + u[t] along dim 1 of [B, T, D] tensors, y[-1] = 0."""
    B, T, D = u.shape
    if T <= BLOCK:
        return _scan_rows(a, u)
    pad = -T % BLOCK
    a, u = (F.pad(t, (0, 0, 0, pad)) for t in (a, u))
    n_blocks = (T + pad) // BLOCK
    a, u = a.reshape(B, n_blocks, BLOCK, D), u.reshape(B, n_blocks, BLOCK, D)
    local = _scan_rows(a.flatten(0, 1), u.flatten(0, 1)).view(B, n_blocks, BLOCK, D)
    decay = torch.cumprod(a, dim=2)  # product of the gates from the block start
    # state at the end of each block, then the state entering each block (shifted by one)
    ends = linear_scan(decay[:, :, -1], local[:, :, -1])
    carry_in = F.pad(ends[:, :-1], (0, 0, 1, 0))
    y = local + decay * carry_in.unsqueeze(2)
    return y.reshape(B, T + pad, D)[:, :T]


def _scan_rows(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Scan each row of [N, S, D] from a zero state with a loop over the S positions.

    unbind rather than indexing: its backward is one stack, where S index ops would each
    materialise a zero-filled full-size gradient.
    """
    a_rows, u_rows = a.unbind(1), u.unbind(1)
    y = [u_rows[0]]
    for s in range(1, len(u_rows)):
        y.append(a_rows[s] * y[-1] + u_rows[s])
    return torch.stack(y, 1)
