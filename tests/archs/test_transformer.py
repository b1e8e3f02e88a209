"""Transformer backbone: causality, KV-cache decoding, GQA, FLOP and parameter counts, weight tying."""
import math

import pytest
import torch

from archlab.archs.config import ModelConfig
from archlab.archs.layers.rope import RotaryEmbedding
from archlab.archs.registry import build_model


def tiny_model(**overrides):
    torch.manual_seed(0)
    cfg = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=96) | overrides
    return build_model(ModelConfig(**cfg))


@pytest.mark.parametrize("causal", [True, False])
def test_future_tokens_reach_earlier_outputs_only_when_bidirectional(causal):
    backbone = tiny_model().backbone
    x = torch.randn(2, 9, 64)
    changed = x.clone()
    changed[:, 6] += 1.0
    before, after = backbone(x, causal=causal), backbone(changed, causal=causal)
    assert torch.equal(before[:, :6], after[:, :6]) == causal
    assert not torch.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_cached_decoding_equals_full_recompute(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads).eval()
    tokens = torch.randint(0, 256, (2, 12))
    full = model.objective.logits(model, tokens)
    cache = model.backbone.new_cache(2, 12)
    # a 5-byte prompt, then a chunk of 3 (queries after a filled cache), then one byte at a time
    pieces = [tokens[:, :5], tokens[:, 5:8]] + [tokens[:, i:i + 1] for i in range(8, 12)]
    cached = torch.cat([model.objective.logits(model, piece, cache=cache) for piece in pieces], dim=1)
    assert cache[0].length == 12
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def at(x, position):
        return rope(x, x, position)[0]

    # q at position p + 3 and k at position p give the same score for every p; rotations keep norms
    scores = torch.stack([(at(q, p + 3) * at(k, p)).sum() for p in (0, 5, 1000)])
    torch.testing.assert_close(scores, scores[0].expand(3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(at(q, 7).norm(), q.norm())
    assert torch.equal(at(q, 0), q)


def test_cache_overflow_and_batch_mismatch_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="KV cache holds 4 positions but 5 are needed"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=model.backbone.new_cache(1, 4))
    with pytest.raises(ValueError, match="make a new cache for this batch"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.backbone.new_cache(1, 4))


def test_grouped_query_attention_equals_multi_head_with_shared_kv():
    """GQA with kv head j serving query heads 2j, 2j+1 is MHA whose k/v heads are copies in that order."""
    gqa, mha = tiny_model(n_kv_heads=2), tiny_model(n_kv_heads=4)
    state = gqa.state_dict()
    for name, weight in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = weight.reshape(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(mha(tokens), gqa(tokens))


def test_reference_and_torch_backends_give_the_same_model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    fast, slow = build_model(cfg), build_model(cfg, kernels={"attention": "reference"})
    slow.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(slow(tokens), fast(tokens))
    with pytest.raises(ValueError, match="unknown backend 'flash' for attention"):
        build_model(cfg, kernels={"attention": "flash"})


def test_flops_per_token_by_hand():
    # d=64, d_kv=2 heads x 16=32, SwiGLU width 96, 2 layers, vocab 256, seq_len 10
    model = tiny_model()
    projections = 2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 32 + 2 * 64 * 64  # q, k, v, o = 24576
    mlp = 3 * 2 * 64 * 96  # gate, up, down = 36864
    bidirectional = 2 * (projections + mlp + 2 * 2 * 10 * 64)  # every token attends to all 10
    causal = 2 * (projections + mlp + 2 * 2 * 5.5 * 64)  # on average to (10 + 1) / 2
    assert model.backbone.flops_per_token(10, causal=False) == bidirectional == 128000
    assert model.backbone.flops_per_token(10, causal=True) == causal == 125696
    assert model.flops_per_token(10) == causal + 2 * 64 * 256  # + the head, the model is causal


def test_parameter_count_by_hand():
    embedding = 256 * 64
    per_layer = (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64) + 3 * 64 * 96 + 2 * 64  # attention, mlp, 2 norms
    tied = embedding + 2 * per_layer + 64  # + the final norm
    assert tiny_model().num_parameters() == tied == 78144
    assert tiny_model().num_parameters(exclude_embeddings=True) == tied - embedding
    assert tiny_model(tie_embeddings=False).num_parameters() == tied + 256 * 64


def test_tied_head_is_the_embedding_and_stored_once():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.objective.head_weight(tied) is tied.embedding.weight
    assert not any("lm_head" in name for name in tied.state_dict())
    assert untied.objective.head_weight(untied).data_ptr() != untied.embedding.weight.data_ptr()
    tied.objective.loss(tied, torch.randint(0, 256, (2, 9)))[0].backward()
    assert tied.embedding.weight.grad is not None


def test_residual_output_projections_are_scaled_down():
    model = tiny_model(d_model=256, n_layers=8, n_heads=4, n_kv_heads=None, mlp_hidden=None)
    block = model.backbone.blocks[0]
    for weight, std in [(block.mixer.q_proj.weight, 0.02), (block.mlp.w_up.weight, 0.02),
                        (block.mixer.o_proj.weight, 0.02 / math.sqrt(16)), (block.mlp.w_down.weight, 0.02 / 4)]:
        assert weight.std().item() == pytest.approx(std, rel=0.05)


def test_objective_that_needs_causal_rejects_a_bidirectional_config():
    with pytest.raises(ValueError, match="needs a causal backbone; set model.causal=true or leave it unset"):
        tiny_model(causal=False)
    assert tiny_model(causal=True).causal and tiny_model().causal
