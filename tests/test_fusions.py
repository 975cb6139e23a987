"""model.fusions: every fused implementation computes what the plain model computes (loss and every
gradient), the choices resolve per device, and what a machine cannot run is one clear error.

On CPU the torch.compile and Megatron fusions run here; Liger-Kernel's Triton kernels run on CUDA only
(the CUDA test runs in the GPU session: bench/results/gpu-tests-*.log)."""

from __future__ import annotations

import pytest
import torch
from test_model import SEQ, make_batch
from test_model import tiny as model_tiny

from moba_train import distributed, fusions
from moba_train.config import Config, ConfigError
from moba_train.model import build_model, forward_step


def tiny(fused: dict | None = None, **sections) -> Config:
    """test_model's 2-layer model with its last layer full and the given fusions (the rest plain)."""
    model = {"fusions": dict(fusions.PLAIN, **(fused or {})), **sections.pop("model", {})}
    attention = {"full_layers": 1, **sections.pop("attention", {})}
    return model_tiny(model=model, attention=attention, **sections)


@pytest.fixture(scope="module", autouse=True)
def single_process():
    distributed.init_distributed(tiny())
    yield
    distributed.destroy_distributed()


def batch(b: int = 2, seed: int = 0) -> dict:
    return make_batch(b, SEQ, seed=seed)


def loss_and_grads(cfg: Config, data: dict):
    distributed.set_seed(7)
    model = build_model(cfg)
    loss_sum, count = forward_step(model, data)
    (loss_sum / count).backward()
    return (loss_sum / count).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model


def test_auto_is_plain_on_cpu_and_the_measured_fusions_on_cuda():
    cfg = Config.model_validate({})
    assert fusions.resolve(cfg, torch.device("cpu")) == fusions.PLAIN
    expected = dict(fusions.FUSED_DEFAULTS)
    if not fusions.liger_available():
        expected.update(fusions.WITHOUT_LIGER)
    assert fusions.resolve(cfg, torch.device("cuda")) == expected


def test_what_this_machine_cannot_run_is_one_clear_error():
    cfg = Config.model_validate({"model": {"fusions": {"rmsnorm": "liger"}}})
    with pytest.raises(ConfigError, match=r"model.fusions.rmsnorm=liger needs a CUDA device.*set model.fusions"):
        fusions.resolve(cfg, torch.device("cpu"))
    te = Config.model_validate({"model": {"transformer_impl": "te", "fusions": {"swiglu": "megatron"}}})
    with pytest.raises(ConfigError, match="Transformer Engine's layers fuse it themselves"):
        fusions.resolve(te, torch.device("cuda"))


@pytest.mark.parametrize("op,choice", [("rmsnorm", "compile"), ("rmsnorm", "triton"), ("swiglu", "megatron"),
                                       ("rope", "compile"),
                                       ("rope", "triton"), ("cross_entropy", "megatron_fused"),
                                       ("cross_entropy", "fused_linear")])
def test_each_fusion_computes_the_plain_models_loss_and_gradients(op, choice, monkeypatch):
    from moba_train.kernels import rmsnorm, rope

    calls, chunked, norms, fused_qkv = [], [], [], []
    monkeypatch.setattr(rope, "rope_triton", lambda *a: calls.append(1) or rope._RoPE.apply(a[0], a[1][:, 0, 0]))
    qkv_rope_triton = rope.qkv_rope_triton
    monkeypatch.setattr(rope, "qkv_rope_triton", lambda *a: fused_qkv.append(1) or qkv_rope_triton(*a))
    for name in ("rms_norm", "rms_norm_with_residual", "add_rms_norm"):
        kernel = getattr(rmsnorm, name)
        monkeypatch.setattr(rmsnorm, name, lambda *a, kernel=kernel, name=name: norms.append(name) or kernel(*a))
    linear_cross_entropy = fusions.linear_cross_entropy
    monkeypatch.setattr(fusions, "linear_cross_entropy", lambda *a: chunked.append(1) or linear_cross_entropy(*a))
    data = batch()
    reference_loss, reference_grads, plain = loss_and_grads(tiny(), data)
    loss, grads, fused = loss_and_grads(tiny({op: choice}), data)
    # rope=triton: the QKV projection split and rotated by one kernel in each of the two layers, no fallback
    assert (len(fused_qkv), len(calls)) == ((2, 0) if (op, choice) == ("rope", "triton") else (0, 0))
    assert len(chunked) == (1 if choice == "fused_linear" else 0)
    # the layers' residual forms (two layers) and the final norm, no fallback to Megatron's forward
    assert sorted(norms) == (["add_rms_norm"] * 2 + ["rms_norm"] + ["rms_norm_with_residual"] * 2
                             if choice == "triton" and op == "rmsnorm" else [])
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints and conversions unchanged
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    # Megatron's native fused cross-entropy rounds the logits' gradient to bf16 (its code does, whatever the
    # training precision): about 2^-9 relative, so its gradients are compared at bf16's resolution.
    for name, grad in grads.items():
        reference = reference_grads[name]
        rtol, atol = (1e-2, 4e-3 * reference.abs().max().item()) if choice == "megatron_fused" else (1e-4, 1e-6)
        torch.testing.assert_close(grad, reference, rtol=rtol, atol=atol, msg=name)
    # The choice took effect where it should (a fusion that silently fell back would pass the above).
    layer = fused.decoder.layers[0]
    if op == "rmsnorm":
        norm = fusions.TritonRMSNorm if choice == "triton" else fusions.CompiledRMSNorm
        assert type(layer.input_layernorm) is norm and type(fused.decoder.final_layernorm) is norm
        assert (type(layer) is fusions.fused_norm_layer_class()) == (choice == "triton")
    elif op == "swiglu":
        assert layer.config.bias_activation_fusion
    elif op == "rope":
        from megatron.core.models.common.embeddings import rope_utils

        assert layer.config.apply_rope_fusion and rope_utils.fused_apply_rotary_pos_emb is fusions._fused_rope
        assert fusions._ROPE["impl"] == choice
        fused_attention = type(layer.self_attention) is fusions.fused_qkv_rope_attention_class()
        assert fused_attention == (choice == "triton")
        assert (layer.self_attention.config is not layer.config) == fused_attention  # the flag's own copy
    elif choice == "fused_linear":
        assert fused.fused_linear_loss and not plain.fused_linear_loss
    else:
        assert layer.config.cross_entropy_loss_fusion and layer.config.cross_entropy_fusion_impl == "native"


@pytest.mark.parametrize("choice", ["compile", "triton"])
def test_the_fused_rope_keeps_packed_documents_exact(choice, monkeypatch):
    """Packed documents (thd) take the hook: with rope=triton our kernel over all tokens at once (the attention
    leaves its fused QKV path for them: Megatron asserts on the flag there), with compile Megatron's
    per-sequence RoPE."""
    from moba_train.kernels import rope

    fused_qkv, rotations = [], []
    qkv_rope_triton, rope_triton = rope.qkv_rope_triton, rope.rope_triton
    monkeypatch.setattr(rope, "qkv_rope_triton", lambda *a: fused_qkv.append(1) or qkv_rope_triton(*a))
    monkeypatch.setattr(rope, "rope_triton", lambda *a: rotations.append(a[0].shape) or rope_triton(*a))
    data = batch()
    data["cu_seqlens"] = torch.tensor([0, 20, 64, 100, 128], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in (20, 44, 36, 28)]).view(2, SEQ)
    data["position_ids"] = positions
    reference_loss, reference_grads, _ = loss_and_grads(tiny(), data)
    loss, grads, _ = loss_and_grads(tiny({"rope": choice}), data)
    assert not fused_qkv
    # triton: queries and keys of both layers, each one call over the 128 packed tokens
    assert rotations == ([(128, 1, 4, 16), (128, 1, 2, 16)] * 2 if choice == "triton" else [])
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("cp_size,cp_rank,exact", [(1, 0, False), (1, 0, True), (2, 1, False), (2, 0, True)])
def test_packed_angles_are_megatrons_per_document_choice(cp_size, cp_rank, exact):
    """`_packed_freqs` against Megatron's `_apply_rotary_pos_emb_thd` (which rotates by the angles it chooses):
    each document from position 0, or at its offset when freqs covers every packed position; under context
    parallelism this rank's two chunks of every document. Rotating by our angles gives Megatron's result."""
    from megatron.core.models.common.embeddings import rope_utils

    bounds = [0, 24, 64, 96, 128]  # whole documents, each split into 2 x cp_size chunks under CP
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    freqs = torch.rand(128 if exact else 80, 1, 1, 16, generator=gen) * 6
    t = torch.randn(128 // cp_size, 3, 16, generator=gen)

    class Group:  # Megatron's thd path reads only the group's size and rank
        def size(self):
            return cp_size

        def rank(self):
            return cp_rank

    reference = rope_utils._apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_group=Group())
    fusions._PACKED_FREQS.clear()
    angles = fusions._packed_freqs(t, cu_seqlens, freqs, cp_size, cp_rank)
    assert angles.shape == (128 // cp_size, 1, 1, 16)
    rotated = rope_utils._apply_rotary_pos_emb_bshd(t[:, None], angles)[:, 0]
    torch.testing.assert_close(rotated, reference, rtol=0, atol=0)
    assert fusions._packed_freqs(t, cu_seqlens, freqs, cp_size, cp_rank) is angles  # the next layer's call
    freqs.mul_(2)  # new values in the same tensor are not the cached ones
    assert fusions._packed_freqs(t, cu_seqlens, freqs, cp_size, cp_rank) is not angles


def test_selective_recomputation_recomputes_the_mlp_only():
    data = batch()
    reference_loss, reference_grads, _ = loss_and_grads(tiny(), data)
    loss, grads, model = loss_and_grads(tiny(train={"recompute": "selective"}), data)
    layer = model.decoder.layers[0]
    assert layer.recompute_mlp and layer.config.recompute_modules == ["mlp"]  # the attention never runs twice
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_fused_layers_under_full_recomputation(monkeypatch):
    """rmsnorm=triton and rope=triton together with whole layers recomputed (Megatron's checkpointing runs each
    layer's forward again in the backward, the fused QKV path included): the plain model's loss and gradients."""
    from moba_train.kernels import rope

    fused_qkv = []
    qkv_rope_triton = rope.qkv_rope_triton
    monkeypatch.setattr(rope, "qkv_rope_triton", lambda *a: fused_qkv.append(1) or qkv_rope_triton(*a))
    data = batch()
    reference_loss, reference_grads, _ = loss_and_grads(tiny(), data)
    loss, grads, _ = loss_and_grads(tiny({"rmsnorm": "triton", "rope": "triton"}, train={"recompute": "full"}), data)
    assert len(fused_qkv) == 4  # two layers, each run twice
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_the_fused_norm_layers_under_recomputation_and_packed_documents(recompute):
    """rmsnorm=triton's layers inside Megatron's checkpointing (the MLP's, or whole layers') and on the thd path of
    packed documents: the plain model's loss and gradients."""
    data = batch()
    data["cu_seqlens"] = torch.tensor([0, 20, 64, 100, 128], dtype=torch.int32)
    data["position_ids"] = torch.cat([torch.arange(n) for n in (20, 44, 36, 28)]).view(2, SEQ)
    reference_loss, reference_grads, _ = loss_and_grads(tiny(), data)
    loss, grads, model = loss_and_grads(tiny({"rmsnorm": "triton"}, train={"recompute": recompute}), data)
    assert type(model.decoder.layers[0]) is fusions.fused_norm_layer_class()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_fused_norm_layer_leaves_what_it_does_not_cover_to_megatron(monkeypatch):
    """Dropout on the residual branch in training is outside the fused form: that layer runs Megatron's forward
    (its norms through TritonRMSNorm alone), the other layer stays fused, and the loss is the plain model's."""
    from moba_train.kernels import rmsnorm

    calls = []
    for name in ("rms_norm", "rms_norm_with_residual", "add_rms_norm"):
        kernel = getattr(rmsnorm, name)
        monkeypatch.setattr(rmsnorm, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    data = batch()
    distributed.set_seed(7)
    model = build_model(tiny({"rmsnorm": "triton"}))
    model.decoder.layers[0].hidden_dropout = 0.5
    assert not model.decoder.layers[0]._fusable({"hidden_states": None})
    model.eval()  # dropout off again: the fallback must compute the same function
    assert model.decoder.layers[0]._fusable({"hidden_states": None})
    model.train()
    model.decoder.layers[0].hidden_dropout = 0.0
    reference, _ = forward_step(model, data)
    calls.clear()
    model.decoder.layers[0].hidden_dropout = 1e-12  # outside the fused form, and numerically no dropout
    loss, _ = forward_step(model, data)
    assert sorted(calls) == ["add_rms_norm", "rms_norm", "rms_norm", "rms_norm", "rms_norm_with_residual"]
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's kernels run on CUDA only")
def test_liger_fusions_compute_the_plain_models_loss_and_gradients_on_cuda():
    pytest.importorskip("liger_kernel")
    data = batch()
    liger = {"rmsnorm": "liger", "swiglu": "liger", "cross_entropy": "liger"}
    reference_loss, reference_grads, _ = loss_and_grads(tiny(run={"device": "cuda"}, train={"precision": "fp32"}), data)
    loss, grads, model = loss_and_grads(tiny(liger, run={"device": "cuda"}, train={"precision": "fp32"}), data)
    from liger_kernel.megatron import LigerMegatronRMSNorm

    assert isinstance(model.decoder.layers[0].input_layernorm, LigerMegatronRMSNorm)
    assert isinstance(model.decoder.layers[0].mlp.activation_func, fusions.LigerSwiGLU)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("rmsnorm", ["liger", "triton"])
def test_every_fused_module_takes_part_in_checkpoints(rmsnorm, monkeypatch):
    """Megatron's checkpoints walk the modules' sharded_state_dict: a fused module must answer it, with the
    plain model's keys (Liger's modules are built here, on CPU, with the choice forced: building runs no
    kernel, and on CUDA `auto` picks them)."""
    pytest.importorskip("liger_kernel")
    distributed.set_seed(7)
    plain = build_model(tiny()).sharded_state_dict()
    fused = {"rmsnorm": rmsnorm, "swiglu": "liger", "rope": "triton", "grad_accumulation": "fused",
             "cross_entropy": "liger"}
    monkeypatch.setattr(fusions, "resolve", lambda cfg, device: dict(fused))
    model = build_model(tiny())
    assert type(model.decoder.layers[0].mlp.activation_func).__name__ == "LigerSwiGLU"
    assert model.sharded_state_dict().keys() == plain.keys()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_linear_cross_entropy_matches_the_definition_with_any_token_gradients(dtype, tol, chunk):
    """Losses and both gradients against cross-entropy of the full logits in float64, with an arbitrary
    gradient per token (a loss mask or weights), for chunks of one token, uneven chunks and one chunk."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 50
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    labels, upstream = torch.randint(0, v, (n,), generator=g), torch.randn(n, generator=g)
    upstream[::5] = 0.0  # masked tokens
    ref_h, ref_w = (x.to(dtype).double().requires_grad_() for x in (hidden, weight))
    expected = F.cross_entropy(ref_h @ ref_w.t(), labels, reduction="none")
    expected.backward(upstream.double())
    x, w = (t.to(dtype).requires_grad_() for t in (hidden, weight))
    losses = fusions.linear_cross_entropy(x, w, labels, chunk)
    losses.backward(upstream)
    assert losses.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == dtype
    for got, want in ((losses, expected), (x.grad, ref_h.grad), (w.grad, ref_w.grad)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol * want.abs().max().item())


def test_fused_linear_loss_with_tied_embeddings_and_its_tensor_parallel_refusal():
    data = batch()
    tied = {"tie_embeddings": True}
    reference_loss, reference_grads, _ = loss_and_grads(tiny(model=tied), data)
    loss, grads, model = loss_and_grads(tiny({"cross_entropy": "fused_linear"}, model=tied), data)
    assert model.fused_linear_loss and model.share_embeddings_and_output_weights
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    cfg = Config.model_validate({"parallel": {"tensor": 2}, "model": {"fusions": {"cross_entropy": "fused_linear"}}})
    with pytest.raises(ConfigError, match="fused_linear computes the whole vocabulary on one rank.*parallel.tensor=2"):
        fusions.resolve(cfg, torch.device("cpu"))
