"""Block diffusion (BD3-LM): the block-causal layout, its two limits (one block = MDLM exactly, block size 1 = an
autoregressive likelihood in expectation), KV-cached decoding against the training pass, documents, the sampler,
reproducible evaluation and training through the Trainer."""
import pytest
import torch

from archlab.archs.block_layout import BlockLayout
from archlab.archs.config import ModelConfig
from archlab.archs.documents import Documents
from archlab.archs.registry import build_model
from archlab.train.config import load_config
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer

from ..train.conftest import TINY
from .eval_checks import assert_reproducible_eval

MASK = 256
SMALL = dict(d_model=32, n_layers=2, attention={"n_heads": 2, "n_kv_heads": 1})


def tiny_model(objective="block_diffusion", block_size=4, **overrides):
    torch.manual_seed(0)
    extra = {"block_diffusion": {"block_size": block_size}} if objective == "block_diffusion" else {}
    return build_model(ModelConfig(**(SMALL | {"objective": objective} | extra | overrides))).eval()


def test_training_layout_is_bd3lms_mask():
    seq_len, size = 8, 2
    layout = BlockLayout.training(seq_len, size)
    for q in range(2 * seq_len):
        for k in range(2 * seq_len):
            q_clean, k_clean = q >= seq_len, k >= seq_len
            q_block, k_block = (q % seq_len) // size, (k % seq_len) // size
            expected = ((q_block == k_block and q_clean == k_clean)  # M_BD
                        or (not q_clean and k_clean and k_block < q_block)  # M_OBC
                        or (q_clean and k_clean and k_block <= q_block))  # M_BC
            assert bool(layout.mask[q, k]) == expected, (q, k)
    assert layout.positions.tolist() == [list(range(seq_len)) * 2]


def test_decoding_layout_is_block_causal_over_cache_and_new_positions():
    one_block = BlockLayout.decoding(8, 4, 4, store=0)
    assert one_block.mask is None and one_block.positions.tolist() == [[8, 9, 10, 11]] and one_block.store == 0
    two = BlockLayout.decoding(4, 8, 4, store=4)  # blocks 1 and 2 after a cache holding block 0; block 1 stored
    assert two.mask.shape == (8, 12) and two.store == 4
    assert two.mask[:4].sum(1).tolist() == [8] * 4 and two.mask[4:].sum(1).tolist() == [12] * 4


def test_one_block_is_mdlm_exactly():
    """block_size = seq_len: same weights, same seeds -> MDLM's loss, evaluation and FLOP count, bit for bit."""
    mdlm, bd = tiny_model("masked_diffusion"), tiny_model(block_size=32)
    bd.load_state_dict(mdlm.state_dict())
    batch = torch.randint(0, 256, (4, 33))
    for model in (mdlm, bd):
        model.train()
    torch.manual_seed(1)
    mdlm_loss, mdlm_metrics = mdlm.objective.loss(mdlm, batch)
    torch.manual_seed(1)
    bd_loss, bd_metrics = bd.objective.loss(bd, batch)
    assert torch.equal(mdlm_loss, bd_loss) and mdlm_metrics == bd_metrics
    assert mdlm.objective.evaluate(mdlm, batch) == bd.objective.evaluate(bd, batch)
    assert mdlm.objective.training_flops_per_token(mdlm, 32) == bd.objective.training_flops_per_token(bd, 32)


def test_block_size_one_is_autoregressive_in_expectation():
    """Each byte is masked with probability t and weighted 1/t, so E[NELBO] = sum_i -log p(x_i | x_<i, mask at i);
    that conditional reads no byte from i on, so it is an autoregressive likelihood."""
    model = tiny_model(block_size=1)
    objective = model.objective
    x = torch.randint(0, 256, (2, 16))
    all_masked = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        logits = objective.head(model, objective.denoiser_hidden(model, torch.full_like(x, MASK), x, None))
        for i in range(16):  # change bytes i.. : the prediction at i does not move
            changed = x.clone()
            changed[:, i:] = torch.randint(0, 256, changed[:, i:].shape)
            again = objective.head(model, objective.denoiser_hidden(model, torch.full_like(x, MASK), changed, None))
            torch.testing.assert_close(again[:, i], logits[:, i], rtol=0, atol=1e-5)
        ar_nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="sum").item()
        assert objective.weighted_nll(model, x, torch.ones(x.shape), all_masked).item() == pytest.approx(ar_nats)
        torch.manual_seed(0)
        estimates = torch.tensor([objective.loss(model, torch.cat([x, x[:, :1]], 1))[0].item() * x.numel()
                                  for _ in range(400)])
    standard_error = estimates.std().item() / 20
    assert abs(estimates.mean().item() - ar_nats) < 4 * standard_error, (estimates.mean(), ar_nats, standard_error)


def test_noisy_block_reads_its_noisy_self_and_earlier_clean_blocks_only():
    model = tiny_model(block_size=4)
    objective = model.objective
    x = torch.randint(0, 256, (2, 16))
    z = x.masked_fill(torch.rand(x.shape) < 0.5, MASK)
    with torch.no_grad():
        hidden = objective.denoiser_hidden(model, z, x, None)
        for block in range(4):
            own = slice(4 * block, 4 * block + 4)
            z_other, x_later = z.clone(), x.clone()
            z_other[:, :own.start] = MASK  # other noisy blocks
            z_other[:, own.stop:] = MASK
            x_later[:, own.start:] = torch.randint(0, 256, x_later[:, own.start:].shape)  # clean blocks from here
            again = objective.denoiser_hidden(model, z_other, x_later, None)
            torch.testing.assert_close(again[:, own], hidden[:, own], rtol=0, atol=1e-5)
            if block:  # and it does read the clean blocks before it
                x_earlier = x.clone()
                x_earlier[:, :own.start] = (x_earlier[:, :own.start] + 1) % 256
                assert not torch.allclose(objective.denoiser_hidden(model, z, x_earlier, None)[:, own], hidden[:, own])


def test_cached_decoding_matches_the_training_pass():
    """A block denoised after a KV cache of the clean blocks sees what the training pass shows it, whether the pass
    also carries clean blocks into the cache (the prompt's two, then each finished one) or reads the cache only."""
    from archlab.archs.objectives.block_diffusion import CachedBlocks

    model = tiny_model(block_size=4)
    objective = model.objective
    x = torch.randint(0, 256, (3, 16))
    z = x.masked_fill(torch.rand(x.shape) < 0.5, MASK)
    with torch.no_grad():
        expected = objective.head(model, objective.denoiser_hidden(model, z, x, None))
        blocks = CachedBlocks(objective, model, x[:, :8], 16)
        for start in (8, 12):
            for _ in range(2):  # the first pass stores the pending clean blocks, the second only reads
                got = blocks.logits(z[:, start:start + 4])
                torch.testing.assert_close(got, expected[:, start:start + 4], rtol=1e-5, atol=1e-5)
                assert blocks.cache[0].length == start  # the block being denoised is never stored
            blocks.finish(x[:, start:start + 4])
        assert torch.equal(blocks.tokens, x)
        with pytest.raises(ValueError, match="layout starts at position 8 but the cache holds 12"):
            model(x[:, 8:12], cache=blocks.cache, layout=BlockLayout.decoding(8, 4, 4, store=0))
    with pytest.raises(NotImplementedError, match="use denoiser_hidden"):
        objective.logits(model, z)


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_sampling_with_the_cache_equals_sampling_with_training_passes(strategy, monkeypatch):
    """The whole sampler (a prompt ending inside a block, steps split over blocks, cache fills riding along) gives
    the same greedy samples as one that recomputes every step with the training pass over [z, x]."""
    from archlab.archs.objectives.block_diffusion import CachedBlocks

    model = tiny_model(block_size=4, init_std=0.5)  # large weights: every byte drawn depends on its context
    objective = model.objective
    prompt = torch.randint(0, 256, (2, 6))

    def sample():
        return objective.sample(model, prompt, 10, steps=7, strategy=strategy, temperature=0,
                                generator=torch.Generator().manual_seed(0))

    cached = sample()

    def uncached_logits(self, z):
        start = self.tokens.shape[1]  # the clean tokens before this block; its own clean copy is never read
        noisy, clean = torch.cat([self.tokens, z], dim=1), torch.cat([self.tokens, z.clamp(max=255)], dim=1)
        return objective.head(model, objective.denoiser_hidden(model, noisy, clean, None))[:, start:]

    monkeypatch.setattr(CachedBlocks, "logits", uncached_logits)
    assert torch.equal(sample(), cached)


def test_packed_documents_stay_apart():
    model = tiny_model(block_size=4)
    objective = model.objective
    documents = Documents.from_lengths([[6, 10], [16]])
    x = torch.randint(0, 256, (2, 16))
    z = x.masked_fill(torch.rand(x.shape) < 0.5, MASK)
    with torch.no_grad():
        hidden = objective.denoiser_hidden(model, z, x, documents)
        changed_x, changed_z = x.clone(), z.clone()
        changed_x[0, :6] = (changed_x[0, :6] + 7) % 256
        changed_z[0, :6] = MASK
        again = objective.denoiser_hidden(model, changed_z, changed_x, documents)
        torch.testing.assert_close(again[0, 6:], hidden[0, 6:], rtol=0, atol=1e-5)  # the second document
        # the second row (one document) is the plain layout's
        alone = objective.denoiser_hidden(model, z[1:], x[1:], None)
        torch.testing.assert_close(hidden[1], alone[0], rtol=1e-5, atol=1e-5)
        # a document's positions restart: its layout gives the second document positions 0..9
        layout = BlockLayout.training(16, 4, documents=documents)
        assert layout.positions[0, 6:16].tolist() == list(range(10))


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_sampler_keeps_the_prompt_and_counts_its_passes(strategy):
    model = tiny_model(block_size=4)
    objective = model.objective
    prompt = torch.randint(0, 256, (2, 6))  # ends inside block 1: its tail is in the first block denoised
    out = objective.sample(model, prompt, 10, steps=6, strategy=strategy, generator=torch.Generator().manual_seed(0),
                           context_len=16)
    assert out.shape == (2, 16) and torch.equal(out[:, :6], prompt) and int(out.max()) < 256
    stats = objective.last_sample_stats
    # blocks 1..3 generated, 6 / 3 = 2 steps each, one pass each (the cache fills ride along)
    assert stats["steps"] == 6 and stats["blocks_to_generate"] == 3
    if strategy == "confidence":
        assert stats["network_evals"] == 6
        aligned = prompt[:, :4]  # then every block to generate starts fully masked
        objective.sample(model, aligned, 12, steps=7, strategy=strategy)  # 3 + 2 + 2 steps
        assert objective.last_sample_stats["steps"] == 7
        objective.sample(model, aligned, 12, steps=2, strategy=strategy)  # one per block at least
        assert objective.last_sample_stats["steps"] == 3
    again = objective.sample(model, prompt, 10, steps=6, strategy=strategy, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    greedy = objective.sample(model, prompt, 4, steps=4, temperature=0, strategy=strategy)
    assert torch.equal(greedy, objective.sample(model, prompt, 4, steps=4, temperature=0, strategy=strategy))


def test_sampler_refuses_bad_settings():
    model = tiny_model(block_size=4)
    prompt = torch.randint(0, 256, (1, 4))
    with pytest.raises(ValueError, match="ancestral or confidence, not 'block'"):
        model.objective.sample(model, prompt, 8, strategy="block")
    with pytest.raises(ValueError, match="exceeds context_len 8"):
        model.objective.sample(model, prompt, 8, context_len=8)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model.objective.sample(model, prompt, 8, steps=0)


def test_config_refusals_and_settings():
    with pytest.raises(ValueError, match=r"mixer mamba cannot .* use mixers that can: attention \[type"):
        ModelConfig(objective="block_diffusion", layers="attention,mamba")
    with pytest.raises(ValueError, match="mixer swa cannot"):  # its window is causal
        ModelConfig(objective="block_diffusion", layers="swa")
    with pytest.raises(ValueError, match="clip_min=0.5 must be below clip_max=0.5"):
        ModelConfig(objective="block_diffusion", block_diffusion={"clip_min": 0.5, "clip_max": 0.5})
    with pytest.raises(ValueError, match="block_size=3 must divide the sequence length 16"):
        tiny_model(block_size=3).objective.check_seq_len(ModelConfig(objective="block_diffusion",
                                                                     block_diffusion={"block_size": 3}), 16)
    assert not ModelConfig(objective="block_diffusion").runs_causally


def test_clipped_training_times_stay_in_range():
    model = tiny_model(block_size=4, block_diffusion={"block_size": 4, "clip_min": 0.3, "clip_max": 0.8})
    times = model.objective.training_times(1000, "cpu")
    assert 0.3 <= times.min() and times.max() <= 0.8
    assert ((times - 0.3) / 0.5 * 1000).floor().sort().values.long().tolist() == list(range(1000))  # stratified


def test_clipping_the_times_cuts_the_loss_estimators_variance():
    """BD3-LM's clipped schedules: no 1/t weights above 1/clip_min, so the per-step estimate varies less."""
    model = tiny_model(block_size=8)
    batch = torch.randint(0, 256, (4, 33))

    def estimates(clip):
        model.objective.clip = clip
        with torch.no_grad():
            return torch.tensor([model.objective.loss(model, batch)[0].item() for _ in range(40)])

    torch.manual_seed(0)
    full, clipped = estimates((1e-3, 1.0)), estimates((0.3, 0.8))
    assert clipped.std() < full.std() / 2, (clipped.std(), full.std())


def test_evaluation_is_reproducible_and_a_bound():
    model = tiny_model(block_size=4)
    first = assert_reproducible_eval(model, torch.randint(0, 256, (4, 17)), "bpb")
    assert first["bound"] == 1.0


def test_decoding_state_is_the_kv_cache():
    from archlab.archs.summary import decoding_state_bytes

    model = tiny_model(block_size=4)
    state = decoding_state_bytes(model, 32, dtype=torch.float32)
    assert state["state_bytes"] == model.backbone.state_bytes(1, 32, dtype=torch.float32) == 2 * 2 * 1 * 32 * 16 * 4
    assert state["state_bytes_4x"] == 4 * state["state_bytes"]
    assert decoding_state_bytes(tiny_model("masked_diffusion"), 32, dtype=torch.float32)["state_bytes"] is None


def test_training_flops_count_both_halves():
    model = tiny_model(block_size=4)
    one_copy = model.backbone.flops_per_token(18, causal=False)  # (32 + 4) / 2 keys per position
    assert model.objective.training_flops_per_token(model, 32) == 3 * (2 * one_copy + 2 * 32 * 256)


def test_trainer_run_lowers_the_bound_and_samples(tmp_path):
    overrides = [f"run.dir={tmp_path}", "model.objective=block_diffusion", "model.block_diffusion.block_size=8",
                 "model.n_layers=1", "train.max_steps=40", "train.eval_every=40", "train.checkpoint_every=40",
                 "train.lr=1e-2", "train.eval_tokens=512", "model.diffusion_eval_draws=2", "sample.tokens=0"]
    trainer = Trainer(load_config(TINY, overrides))
    trainer.train()
    evals = [r["val_bpb"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert abs(evals[0] - 8) < 0.5 and evals[-1] < 6.0, evals
    text = trainer.sample_text("KING", 12, temperature=0.8, top_k=None, seed=0, steps=4, strategy="confidence")
    assert text.startswith("KING") and len(text.encode("utf-8", "surrogateescape")) >= 4
