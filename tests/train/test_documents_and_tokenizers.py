"""Training on documents and on any tokenizer (issue 19): the bits-per-byte scale is one scale, packed rows carry
their documents to the model, prepared datasets train and resume only on themselves, and bad settings are one line."""
import math

import numpy as np
import pytest
import torch

from archlab.archs.model import IGNORE, split_documents
from archlab.train.corpus import separator_starts
from archlab.train.errors import ConfigError, DataError
from archlab.train.loading import load_run
from archlab.train.prepare import prepare_dataset
from archlab.train.trainer import Trainer

from .tokenizer_helpers import real_text, single_byte_tokenizer, tiny_bpe

DOCUMENT_SPLIT = r"^# ===== file: "


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """Real prose and code as ~40 documents, each starting with a `# ===== file:` line."""
    text = real_text(40_000)
    pieces = [text[i: i + 2500] for i in range(0, len(text), 2500)]
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("".join(f"# ===== file: {n} =====\n{piece}\n" for n, piece in enumerate(pieces)))
    return path


@pytest.fixture(scope="module")
def prepared(corpus_file, tmp_path_factory):
    """The same documents prepared three ways: bytes, an hf tokenizer of single bytes, and a 400-token BPE."""
    root = tmp_path_factory.mktemp("prepared")
    single = single_byte_tokenizer(root / "single.json")
    bpe = tiny_bpe(root / "bpe.json")
    specs = {"bytes": "bytes", "single": single.spec, "bpe": bpe.spec}
    return {name: prepare_dataset([corpus_file], root / name, tokenizer=spec, split_on=DOCUMENT_SPLIT,
                                  val_fraction=0.2, workers=1, progress=False)
            for name, spec in specs.items()}


def train(tiny_config, data_dir, tmp_path, *overrides):
    trainer = Trainer(tiny_config(f"data.path={data_dir}", "data.val_fraction=0.2", "train.max_steps=6",
                                  "sample.tokens=0", *overrides, run_dir=tmp_path / data_dir.name))
    return trainer, trainer.train()


def test_a_tokenizer_of_single_bytes_gives_exactly_the_byte_runs_figures(tiny_config, prepared, tmp_path):
    byte_trainer, byte_eval = train(tiny_config, prepared["bytes"], tmp_path)
    single_trainer, single_eval = train(tiny_config, prepared["single"], tmp_path)
    assert single_trainer.corpus.tokenizer.spec.startswith("hf:") and byte_trainer.corpus.tokenizer.spec == "bytes"
    assert single_eval["bpb"] == byte_eval["bpb"] and single_eval["loss"] == byte_eval["loss"]
    assert single_eval["unigram_bpb"] == byte_eval["unigram_bpb"]


def test_bpe_bits_per_byte_divide_nats_by_the_utf8_bytes_of_the_scored_tokens(tiny_config, prepared, tmp_path):
    """A head of zeros predicts uniformly over V tokens: ln V nats per scored token. bpb must then be
    tokens * log2 V / the UTF-8 bytes of exactly those tokens, counted here by decoding each one."""
    trainer, _ = train(tiny_config, prepared["bpe"], tmp_path)
    model, tokenizer = trainer.model, trainer.corpus.tokenizer
    assert model.embedding.num_embeddings == tokenizer.vocab_size == 400
    batch = trainer.eval_set[0]
    assert batch.ndim == 3  # documents batches
    with torch.no_grad():
        model.embedding.weight.zero_()  # tied head: all logits 0
        metrics = model.objective.evaluate(model, batch)
    _, targets, _ = split_documents(batch)
    scored = targets[targets != IGNORE].tolist()
    utf8_bytes = sum(len(tokenizer.decode([t]).encode("utf-8")) for t in scored if t != tokenizer.bos_id)
    assert metrics["n_bytes"] == utf8_bytes
    assert metrics["bpb"] == pytest.approx(len(scored) * math.log2(400) / utf8_bytes, rel=1e-6)
    assert 1.5 < utf8_bytes / len(scored) < 6  # BPE tokens are several bytes: the scale differs from per-token


def test_packed_rows_reach_the_model_and_the_log_counts_long_documents(tiny_config, prepared, tmp_path, capsys):
    trainer = Trainer(tiny_config(f"data.path={prepared['bpe']}", "data.val_fraction=0.2", "train.max_steps=4",
                                  "run.progress=true", "sample.tokens=8", "sample.prompt=The"))
    assert trainer.sampler.batch(0).shape == (8, 2, 33)
    documents = torch.cat([trainer.sampler.batch(i)[:, 1] for i in range(20)])  # documents of ~700 tokens
    assert (documents[:, 1:] >= documents[:, :-1]).all() and (documents[:, 1:] != documents[:, :-1]).any()
    trainer.train()
    assert "documents packed into rows of 33 tokens" in capsys.readouterr().out
    assert isinstance(trainer.sample_text("The", 8, temperature=1.0, top_k=None, seed=0), str)
    stream = Trainer(tiny_config(f"data.path={prepared['bpe']}", "data.val_fraction=0.2", "data.packing=stream",
                                 run_dir=tmp_path / "stream"))
    assert stream.sampler.batch(0).shape == (8, 33)


def test_a_resume_on_other_data_is_refused(tiny_config, prepared, tmp_path):
    run_dir = tmp_path / "resume"
    first = Trainer(tiny_config(f"data.path={prepared['bytes']}", "data.val_fraction=0.2", "train.max_steps=6",
                                "sample.tokens=0", run_dir=run_dir))
    first.train()
    saved = first.cfg.data.identity
    assert saved and len(saved) == 64
    with pytest.raises(ConfigError, match=r"data.identity|model.vocab_size"):
        Trainer(tiny_config(f"data.path={prepared['bpe']}", "data.val_fraction=0.2", "train.max_steps=12",
                            "run.resume=true", "sample.tokens=0", run_dir=run_dir))
    loaded = load_run(run_dir)  # the run's own data still loads
    assert loaded.cfg.data.identity == saved


def test_text_files_take_a_separator_and_refuse_other_tokenizers(tiny_config, corpus_file, tmp_path):
    trainer = Trainer(tiny_config(f"data.path={corpus_file}", "data.sha256=null", "data.separator=^# =====+"))
    assert trainer.sampler.batch(0).shape == (8, 2, 33)
    text = corpus_file.read_bytes()
    starts = separator_starts(np.frombuffer(text, dtype=np.uint8), DOCUMENT_SPLIT)
    assert starts[0] == 0 and len(starts) == text.count(b"# ===== file: ")
    with pytest.raises(DataError, match="needs a prepared dataset"):
        Trainer(tiny_config(f"data.path={corpus_file}", "data.sha256=null", "data.tokenizer=tiktoken:gpt2",
                            run_dir=tmp_path / "x"))
    with pytest.raises(DataError, match="not a valid regex"):
        Trainer(tiny_config(f"data.path={corpus_file}", "data.sha256=null", "data.separator=(",
                            run_dir=tmp_path / "y"))


def test_jepa_refuses_documents_and_a_hand_set_vocabulary_must_match(tiny_config, corpus_file, prepared, tmp_path):
    with pytest.raises(ConfigError, match="one stream of bytes"):
        Trainer(tiny_config(f"data.path={corpus_file}", "data.sha256=null", "data.separator=^# =====+",
                            "model.objective=jepa", "model.causal=true", run_dir=tmp_path / "jepa"))
    with pytest.raises(ConfigError, match="model.vocab_size=512 but the tokenizer"):
        Trainer(tiny_config(f"data.path={prepared['bpe']}", "data.val_fraction=0.2", "model.vocab_size=512",
                            run_dir=tmp_path / "vocab"))
    assert not (tmp_path / "jepa").exists() and not (tmp_path / "vocab").exists()


def test_masked_diffusion_trains_on_packed_bpe_documents(tiny_config, prepared, tmp_path):
    _, final = train(tiny_config, prepared["bpe"], tmp_path, "model.objective=masked_diffusion")
    assert math.isfinite(final["bpb"]) and final["bpb"] > 0
