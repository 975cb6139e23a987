"""kernels/rope.py against RoPE computed independently: each (j, j + d/2) pair of a head as a complex number
rotated by e^{i f} (with the angles of both halves equal, as Llama's are), and Megatron-Core's unfused
rotation for angles that differ between the halves; gradients against autograd through the reference."""

import pytest
import torch
from moba_train.kernels.rope import qkv_rope_supported, qkv_rope_triton, rope_supported, rope_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on CPU (conftest)


def angles(s: int, d: int, theta: float = 500000.0, offset: int = 0) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = torch.outer(torch.arange(offset, offset + s, dtype=torch.float64), inv)
    return torch.cat([f, f], dim=-1).float()[:, None, None, :]


def complex_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t [s, b, h, d] in float64: the pair (t_j, t_{j+d/2}) as t_j + i t_{j+d/2}, times e^{i f_j}."""
    half = t.shape[-1] // 2
    z = torch.complex(t[..., :half].double(), t[..., half:].double())
    z = z * torch.polar(torch.ones_like(freqs[..., :half].double()), freqs[..., :half].double())
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rotation_matches_the_complex_form_at_far_positions(dtype, tol):
    torch.manual_seed(0)
    s, b, h, d = 37, 2, 5, 16
    t = torch.randn(s, b, h, d, dtype=dtype)
    freqs = angles(s, d, offset=100_000)  # large angles: cos/sin argument reduction matters
    out = rope_triton(t.to(DEVICE), freqs.to(DEVICE)).cpu()
    assert out.dtype == dtype and out.shape == t.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), complex_rope(t.double(), freqs), rtol=tol, atol=tol)
    # a rotation keeps every pair's length: an error that scaled the output would fail here too
    torch.testing.assert_close(out.double().norm(dim=-1), t.double().norm(dim=-1), rtol=tol, atol=tol)


def test_strided_views_of_a_fused_projection_and_the_gradient():
    """The query and key of Megatron's fused QKV projection are views (heads interleaved by group); the
    kernel reads them in place. The gradient is autograd's through the complex reference."""
    torch.manual_seed(1)
    s, b, groups, per_group, d = 24, 3, 2, 3, 8
    qkv = torch.randn(s, b, groups, per_group + 2, d, device=DEVICE)
    q = qkv[:, :, :, :per_group].reshape(s, b, groups * per_group, d)  # copies (non-contiguous reshape)
    k = qkv[:, :, :, per_group]  # [s, b, groups, d]: a strided view
    assert not k.is_contiguous()
    freqs = angles(s, d)
    for x in (q, k):
        ref = x.detach().cpu().double().requires_grad_(True)
        x = x.detach().requires_grad_(True)  # keeps the view's strides
        out = rope_triton(x, freqs.to(DEVICE))
        expected = complex_rope(ref, freqs)
        torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(expected)
        out.backward(grad.float().to(DEVICE))
        expected.backward(grad)
        torch.testing.assert_close(x.grad.double().cpu(), ref.grad, rtol=1e-5, atol=1e-5)


def test_different_angles_per_half_follow_megatrons_definition():
    """Megatron's rotation takes the angle of each output column (cos f[j], sin f[j]); the kernel must not
    assume the halves' angles are equal."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    torch.manual_seed(2)
    s, b, h, d = 9, 1, 3, 8
    t = torch.randn(s, b, h, d, dtype=torch.float64, requires_grad=True)
    freqs = torch.rand(s, 1, 1, d, dtype=torch.float64) * 6
    expected = _apply_rotary_pos_emb_bshd(t, freqs)
    tk = t.detach().float().to(DEVICE).requires_grad_(True)
    out = rope_triton(tk, freqs.float().to(DEVICE))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    out.backward(grad.float().to(DEVICE))
    torch.testing.assert_close(tk.grad.double().cpu(), t.grad, rtol=1e-5, atol=1e-5)


def test_shapes_it_does_not_take_are_refused():
    t = torch.randn(4, 1, 2, 12, device=DEVICE)
    assert not rope_supported(t, angles(4, 12))  # d/2 = 6 is not a power of two
    with pytest.raises(ValueError, match="rope_triton rotates"):
        rope_triton(t, angles(4, 12).to(DEVICE))
    assert not rope_supported(torch.randn(4, 1, 2, 16), angles(4, 8))  # partial rotation


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_the_fused_qkv_split_and_rotation_and_its_gradient(dtype, tol):
    """qkv_rope_triton against Megatron's layout split by hand (per group: r query heads, a key head, a value head)
    and the complex-number rotation; the projection's gradient against autograd through that reference. The
    projection is read through a transposed view ([b, s] stored, [s, b] seen), as strides may come."""
    torch.manual_seed(2)
    s, b, g, r, d = 21, 2, 3, 4, 16
    stored = torch.randn(b, s, g, (r + 2) * d, dtype=dtype)
    freqs, k_freqs = angles(s, d, offset=5_000), angles(s, d, offset=7_000)  # keys at other angles: kept apart
    leaf = stored.to(DEVICE).clone().requires_grad_(True)
    x = leaf.transpose(0, 1)
    assert not x.is_contiguous()
    q, k, v = qkv_rope_triton(x, freqs.to(DEVICE), k_freqs.to(DEVICE), r)
    assert q.shape == (s, b, g * r, d) and k.shape == v.shape == (s, b, g, d) and q.dtype == dtype
    ref_leaf = stored.double().clone().requires_grad_(True)
    grouped = ref_leaf.transpose(0, 1).reshape(s, b, g, r + 2, d)
    q_ref = complex_rope(grouped[:, :, :, :r].reshape(s, b, g * r, d), freqs)
    k_ref = complex_rope(grouped[:, :, :, r], k_freqs)
    v_ref = grouped[:, :, :, r + 1]
    for got, want in ((q, q_ref), (k, k_ref), (v, v_ref)):
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=tol, atol=tol)
    grads = [torch.randn_like(t) for t in (q_ref, k_ref, v_ref)]
    torch.autograd.backward((q, k, v), [gr.to(DEVICE, dtype) for gr in grads])
    torch.autograd.backward((q_ref, k_ref, v_ref), grads)
    torch.testing.assert_close(leaf.grad.double().cpu(), ref_leaf.grad, rtol=tol, atol=tol)


def test_the_fused_qkv_form_takes_only_what_it_can_split():
    freqs = angles(8, 16)
    assert qkv_rope_supported(torch.empty(8, 1, 2, 6 * 16), freqs, freqs, 4)
    assert not qkv_rope_supported(torch.empty(8, 1, 2, 6 * 16 + 2), freqs, freqs, 4)  # not (r + 2) heads
    assert not qkv_rope_supported(torch.empty(8, 1, 2, 6 * 12), angles(8, 12), angles(8, 12), 4)  # d/2 = 6
    with pytest.raises(ValueError, match=r"qkv_rope_triton splits \[s, b, g, \(r \+ 2\) \* d\]"):
        qkv_rope_triton(torch.empty(8, 1, 2, 6 * 16 + 2, device=DEVICE), freqs.to(DEVICE), freqs.to(DEVICE), 4)
