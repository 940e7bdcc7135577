"""RoPE: half-split layout, norm-preserving, scores depend only on relative position."""
import torch

from ratpt.ops import apply_rope, rope_cos_sin


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    pos = torch.tensor([0, 3, 5, 8])
    cos, sin = rope_cos_sin(pos, 8, 10000.0, torch.float64)
    qr, kr = apply_rope(q.expand(4, 8), cos, sin), apply_rope(k.expand(4, 8), cos, sin)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm().expand(4))
    torch.testing.assert_close(qr[1] @ kr[0], qr[3] @ kr[2])  # both offsets 3


def test_rope_pairs_dimension_i_with_i_plus_half():
    """Pair 0 = (x[0], x[2]) turns by 1 radian at position 1 (frequency base^0)."""
    cos, sin = rope_cos_sin(torch.tensor([1]), 4, 10000.0, torch.float64)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    expected = torch.stack([one.cos(), torch.zeros_like(one), one.sin(), torch.zeros_like(one)])
    torch.testing.assert_close(apply_rope(x, cos, sin)[0], expected)


def test_attention_decode_compiles_rope_into_its_step_and_training_keeps_the_tables_op():
    """A decode step's tables are traced, so inductor fuses them with the rotation (the opaque op cost
    eleven eager launches a layer); the training forward keeps them one opaque op per block. The
    compiled step equals the eager one."""
    from torch._inductor.utils import run_and_get_code

    from ratpt.model.attention import AttentionMixer
    from ratpt.model.config import ModelConfig

    torch.manual_seed(0)
    mixer = AttentionMixer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, head_dim=8, mixers=["attention"],
                                       kernels="torch"))
    _, cache = mixer.prefill(torch.randn(2, 5, 32), torch.tensor([5, 5]), 8)
    x, positions = torch.randn(2, 1, 32), torch.tensor([5, 5])
    eager_cache = type(cache)(k=cache.k.clone(), v=cache.v.clone())
    expected = mixer.decode(x, eager_cache, positions)
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(mixer.decode), x, cache, positions)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(cache.k, eager_cache.k)
    assert "rope_cos_sin" not in "\n".join(code)
    _, code = run_and_get_code(torch.compile(mixer), torch.randn(2, 6, 32))
    assert "torch.ops.ratpt.rope_cos_sin" in "\n".join(code)
