"""full_attention's sdpa_backend (attention.full_backend): cuDNN's attention computes what PyTorch's default
SDPA computes, and asking for it off CUDA is one clear error."""

import pytest
import torch

from moba_train.attention import full_attention
from moba_train.config import Config


def test_cudnn_off_cuda_is_one_clear_error_and_bad_names_are_refused():
    q = torch.randn(64, 4, 16)
    k = v = torch.randn(64, 2, 16)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match="sdpa_backend 'cudnn' needs CUDA tensors, got cpu"):
        full_attention(q, k, v, cu_seqlens=cu, sdpa_backend="cudnn")
    with pytest.raises(ValueError, match="sdpa_backend must be one of"):
        full_attention(q, k, v, cu_seqlens=cu, sdpa_backend="flash3")
    assert Config.model_validate({"attention": {"full_backend": "cudnn"}}).attention.full_backend == "cudnn"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention runs on CUDA")
def test_cudnn_attention_equals_the_default_sdpa_with_gqa_and_gradients():
    torch.manual_seed(0)
    q = torch.randn(2 * 1024, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2 * 1024, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 1024, 2048], dtype=torch.int32, device="cuda")
    grad = torch.randn_like(q)
    results = []
    for backend in ("sdpa", "cudnn"):
        out = full_attention(q, k, v, cu_seqlens=cu, host_cu_seqlens=([0, 1024, 2048],) * 2, sdpa_backend=backend)
        out.backward(grad)
        results.append([out.detach().float()] + [x.grad.float() for x in (q, k, v)])
        for x in (q, k, v):
            x.grad = None
    for want, got in zip(*results):
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
