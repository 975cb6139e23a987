"""kernels/rmsnorm.py against RMSNorm and the residual add written out in float64, gradients by autograd through
that reference; the backward's weight gradient is summed over several programs' shares (more row tiles than
programs), so a share lost or counted twice fails here."""

import pytest
import torch
from moba_train.kernels import rmsnorm
from moba_train.kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_with_residual

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on CPU (conftest)
EPS = 1e-5


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def leaves(*tensors):
    """Each tensor on the device (in its dtype) and in float64 on the CPU, both requiring grad."""
    return ([t.to(DEVICE).clone().requires_grad_() for t in tensors],
            [t.double().clone().requires_grad_() for t in tensors])


def check(got, want, tol):
    torch.testing.assert_close(got.detach().double().cpu(), want.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("n", [64, 80])  # a power of two, and one the tile pads
def test_add_rms_norm_values_and_gradients(dtype, tol, n, monkeypatch):
    monkeypatch.setattr(rmsnorm, "_backward_programs", lambda rows, block_m, device: 3)
    torch.manual_seed(n)
    rows = 37  # 37 rows in tiles of 16 (n <= 512): 3 tiles, one per program, the last one partial
    x, branch = torch.randn(rows, 1, n, dtype=dtype), torch.randn(rows, 1, n, dtype=dtype)
    w = (1 + 0.3 * torch.randn(n)).to(dtype)
    (x_d, b_d, w_d), (x_r, b_r, w_r) = leaves(x, branch, w)
    h, y = add_rms_norm(x_d, b_d, w_d, EPS)
    assert h.shape == y.shape == x.shape and h.dtype == y.dtype == dtype
    h_r = x_r + b_r
    y_r = reference(h_r, w_r)
    check(h, h_r, tol)
    check(y, y_r, tol)
    dh, dy = torch.randn_like(h_r), torch.randn_like(y_r)
    torch.autograd.backward((h, y), (dh.to(DEVICE, dtype), dy.to(DEVICE, dtype)))
    torch.autograd.backward((h_r, y_r), (dh, dy))
    for got, want in ((x_d.grad, x_r.grad), (b_d.grad, b_r.grad)):
        check(got, want, tol)
    # the weight's gradient sums over all 37 rows: scale the tolerance to its size
    check(w_d.grad, w_r.grad, tol * w_r.grad.abs().max().item())


def test_the_residual_form_sums_both_gradients_of_its_input():
    torch.manual_seed(1)
    x, w = torch.randn(50, 2, 48), 1 + 0.3 * torch.randn(48)
    (x_d, w_d), (x_r, w_r) = leaves(x, w)
    x_out, y = rms_norm_with_residual(x_d, w_d, EPS)
    torch.testing.assert_close(x_out, x_d, rtol=0, atol=0)
    # the residual use of x, as in a layer: x + something, and the norm's output
    out = (x_out * 3.0).sum() + (y * torch.linspace(-1, 1, 48, device=DEVICE)).sum()
    out.backward()
    out_r = (x_r * 3.0).sum() + (reference(x_r, w_r) * torch.linspace(-1, 1, 48, dtype=torch.float64)).sum()
    out_r.backward()
    check(x_d.grad, x_r.grad, 1e-5)
    check(w_d.grad, w_r.grad, 1e-5 * w_r.grad.abs().max().item())
    # the residual use left unused: the norm's gradient alone
    (x_d, w_d), (x_r, w_r) = leaves(x, w)
    rms_norm_with_residual(x_d, w_d, EPS)[1].sum().backward()
    reference(x_r, w_r).sum().backward()
    check(x_d.grad, x_r.grad, 1e-5)


def test_rms_norm_alone_and_outputs_left_unused():
    torch.manual_seed(2)
    x, branch, w = torch.randn(9, 32), torch.randn(9, 32), 1 + 0.3 * torch.randn(32)
    (x_d, w_d), (x_r, w_r) = leaves(x, w)
    rms_norm(x_d, w_d, EPS).pow(2).sum().backward()
    reference(x_r, w_r).pow(2).sum().backward()
    check(x_d.grad, x_r.grad, 1e-5)
    check(w_d.grad, w_r.grad, 1e-5 * w_r.grad.abs().max().item())
    # only h carries a gradient (the norm's output unused): both inputs get h's gradient, the weight none
    (x_d, b_d, w_d), _ = leaves(x, branch, w)
    h, _ = add_rms_norm(x_d, b_d, w_d, EPS)
    (2 * h).sum().backward()
    check(x_d.grad, torch.full((9, 32), 2.0, dtype=torch.float64), 0)
    check(b_d.grad, torch.full((9, 32), 2.0, dtype=torch.float64), 0)
    assert w_d.grad is None


def test_shapes_it_cannot_take_are_one_clear_error():
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \[16\]"):
        rms_norm(x, torch.ones(8, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="one shape and dtype"):
        add_rms_norm(x, torch.randn(4, 8, device=DEVICE), torch.ones(16, device=DEVICE), EPS)
