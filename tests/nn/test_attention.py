import math

import pytest
import torch

from duomo.nn import MultiHeadAttention, Transformer, causal_mask, reference_attention


def test_reference_attention_matches_hand_computation():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    scores = torch.empty(3, 3)
    for i in range(3):
        for j in range(3):
            scores[i, j] = (q[0, 0, i] * k[0, 0, j]).sum() / math.sqrt(4)
    weights = torch.exp(scores) / torch.exp(scores).sum(dim=1, keepdim=True)
    expected = weights @ v[0, 0]
    torch.testing.assert_close(reference_attention(q, k, v)[0, 0], expected)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_fast_path_equals_reference(mask_kind):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4)
    x = torch.randn(3, 7, 32)
    mask = None
    if mask_kind == "bool":
        mask = causal_mask(7)
    elif mask_kind == "float":
        mask = torch.zeros(7, 7).masked_fill(~causal_mask(7), float("-inf"))
    fast = attn(x, mask)
    attn.fast = False
    slow = attn(x, mask)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_causal_mask_blocks_the_future():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2)
    x = torch.randn(1, 5, 16)
    y = x.clone()
    y[:, 3:] = torch.randn(1, 2, 16)  # change only future positions
    out_x, out_y = attn(x, causal_mask(5)), attn(y, causal_mask(5))
    torch.testing.assert_close(out_x[:, :3], out_y[:, :3])
    assert not torch.allclose(out_x[:, 3:], out_y[:, 3:])


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)


def test_transformer_residual_and_checkpointing_agree():
    torch.manual_seed(0)
    net = Transformer(dim=16, depth=2, num_heads=2).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = net(x)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    net.grad_checkpointing = True
    out2 = net(x)
    out2.sum().backward()
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(grad, x.grad)


def test_zeroed_block_is_identity():
    """Pre-LN residual blocks: with zero output projections a block passes its input through unchanged."""
    net = Transformer(dim=8, depth=1, num_heads=2)
    block = net.blocks[0]
    for lin in (block.attn.proj, block.mlp.fc2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(net(x), x)
