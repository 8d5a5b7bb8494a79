"""torch.compile(fullgraph=True) of a module calling the API (padded and varlen): no graph breaks, forward and
backward match eager."""

import torch

import sigattn


class _Block(torch.nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
        self.out = torch.nn.Linear(heads * self.hd, dim)

    def _split(self, x):
        q, k, v = self.qkv(x).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
        shape = x.shape[:-1]
        return (q.unflatten(-1, (self.heads, self.hd)), k.unflatten(-1, (self.kv_heads, self.hd)),
                v.unflatten(-1, (self.kv_heads, self.hd)))

    def forward(self, x, seq_lens=None, cu_seqlens=None, max_seqlen=None):
        q, k, v = self._split(x)
        if cu_seqlens is None:
            o = sigattn.sigmoid_attention(q, k, v, seq_lens=seq_lens, bias="log_n")
        else:
            o = sigattn.sigmoid_attention_varlen(q, k, v, cu_seqlens, max_seqlen, bias=0.5, causal=True)
        return self.out(o.flatten(-2))


def _check(block, *args, **kwargs):
    x = args[0]
    eager_x = x.detach().clone().requires_grad_()
    comp_x = x.detach().clone().requires_grad_()
    eager = block(eager_x, *args[1:], **kwargs)
    eager.square().sum().backward()
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    out = compiled(comp_x, *args[1:], **kwargs)  # fullgraph=True raises on any graph break
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(comp_x.grad, eager_x.grad, rtol=1e-4, atol=1e-5)


def test_compile_padded_fullgraph():
    torch._dynamo.reset()
    block = _Block()
    _check(block, torch.randn(3, 11, 64), torch.tensor([11, 0, 6], dtype=torch.int32))
    explain = torch._dynamo.explain(block)(torch.randn(3, 11, 64), torch.tensor([11, 4, 6], dtype=torch.int32))
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_compile_varlen_fullgraph():
    torch._dynamo.reset()
    block = _Block()
    cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    _check(block, torch.randn(14, 64), cu_seqlens=cu, max_seqlen=9)
