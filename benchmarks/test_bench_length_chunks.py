"""Length-sorted chunks (``length_chunk_size``): one distillation step on the padded batch vs in chunks.

What one step is (the step ``ibkd distill`` runs at the main job's settings): the 2-layer student (teacher
all-MiniLM-L6-v2's layers 1 and 5, ``max_length`` 64, train mode), a batch of 256 sentences drawn with a
fixed seed from the training corpus (wiki + STS-B train sentences, as the CLI's ``extra_stsb_sentences``),
:class:`ibkd.integrations.sentence_transformers.IBKDDistillationLoss` (β = 1, the ``auto`` loss backend),
forward + backward + AdamW, fp32 and under ``torch.autocast("cpu", bfloat16)``. The peers differ only in
``length_chunk_size``: None (the padded batch in one forward, what sentence-transformers' trainer does) and
16, 32, 64 rows per chunk. Tokenisation (the collator's) is outside the step.

Protocol: one process; every peer warmed up once, then ``IBKD_BENCH_CHUNK_ROUNDS`` (default 5) rounds that
call every peer once in a rotating order; medians. The GEMM ceiling is measured at the start and end (in a
fresh process, as ``protocol.py``); a run whose ceiling moved by more than 20 % is written to
``...-noisy.json``. The first step's loss of every peer is checked against the padded one (same weights,
same batch; dropout is off for this check so that the vectors must agree).

    IBKD_DATA_DIR=../shared/data pytest benchmarks/test_bench_length_chunks.py -s

Results: ``results/length-chunks-<machine>.json``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

import bench_common as bc  # noqa: E402
import protocol  # noqa: E402

BATCH = 256
MAX_LENGTH = 64
STUDENT_LAYERS = [1, 5]
PEERS = [None, 16, 32, 64]
DTYPES = ["float32", "bfloat16"]
ROUNDS = int(os.environ.get("IBKD_BENCH_CHUNK_ROUNDS", "5"))


def corpus_batch() -> list[str]:
    data_dir = bc.data_dir()
    wiki = os.path.join(data_dir, "wiki", "wiki_sentences.txt")
    sts = os.path.join(data_dir, "sts", "stsbenchmark", "sts-train.csv")
    if not (os.path.exists(wiki) and os.path.exists(sts)):
        pytest.skip(f"needs the shared data (wiki and STS-B train) in IBKD_DATA_DIR, not found under {data_dir}")
    with open(wiki, encoding="utf-8") as f:
        sentences = [line.strip() for line in f if line.strip()]
    with open(sts, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            sentences += [s for s in row[-2:] if s.strip()]
    return random.Random(0).sample(sentences, BATCH)


def autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def make_step(student_dir: str, features: dict, teacher: torch.Tensor, chunk, dtype: str):
    from sentence_transformers import SentenceTransformer

    from ibkd.integrations.sentence_transformers import IBKDDistillationLoss

    torch.manual_seed(0)
    model = SentenceTransformer(student_dir, device="cpu")
    model.max_seq_length = MAX_LENGTH
    model.train()
    loss_fn = IBKDDistillationLoss(model, teacher_dim=teacher.shape[1], beta=1.0, length_chunk_size=chunk)
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=1e-5)

    def step() -> float:
        with autocast(dtype):
            total = sum(loss_fn([dict(features)], teacher).values())
            total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total.detach())

    def first_loss() -> float:  # dropout off: the chunked vectors must equal the padded ones
        model.eval()
        with torch.no_grad(), autocast(dtype):
            value = float(sum(loss_fn([dict(features)], teacher).values()))
        model.train()
        return value

    return step, first_loss


def test_length_chunks(tmp_path):
    from ibkd.distill.models import Encoder, subset_layers

    threads = torch.get_num_threads()
    doc = {"what": __doc__.split("\n\n")[0], "machine": bc.machine_info("cpu"), "threads": threads,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "batch": BATCH,
           "max_length": MAX_LENGTH, "student_layers": STUDENT_LAYERS, "rounds": ROUNDS,
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "ceiling": {"start": protocol.measure_ceiling(threads)}, "load_start": bc.load_snapshot(), "cases": []}
    sentences = corpus_batch()
    teacher_encoder = Encoder.load("default", max_length=MAX_LENGTH)
    teacher = teacher_encoder.encode(sentences, batch_size=128, amp="off").float()
    student_dir = str(tmp_path / "student")
    subset_layers(teacher_encoder, STUDENT_LAYERS).save(student_dir)
    del teacher_encoder

    from sentence_transformers import SentenceTransformer

    tokenizer_model = SentenceTransformer(student_dir, device="cpu")
    tokenizer_model.max_seq_length = MAX_LENGTH
    prep = getattr(tokenizer_model, "preprocess", None) or tokenizer_model.tokenize
    features = {k: v for k, v in prep(sentences).items()}
    real = int(features["attention_mask"].sum())
    doc["tokens"] = {"padded": int(features["attention_mask"].numel()), "real": real}

    for dtype in DTYPES:
        steps, firsts = {}, {}
        for chunk in PEERS:
            steps[chunk], first = make_step(student_dir, features, teacher, chunk, dtype)
            firsts[chunk] = first()
            steps[chunk]()  # warm-up
        times = {chunk: [] for chunk in PEERS}
        for r in range(ROUNDS):
            order = PEERS[r % len(PEERS):] + PEERS[:r % len(PEERS)]
            for chunk in order:
                t0 = time.perf_counter()
                steps[chunk]()
                times[chunk].append(time.perf_counter() - t0)
        padded = statistics.median(times[None])
        case = {"dtype": dtype, "peers": {}}
        for chunk in PEERS:
            med = statistics.median(times[chunk])
            case["peers"][str(chunk or "padded")] = {
                "length_chunk_size": chunk, "median_s": med, "times_s": times[chunk],
                "sentences_per_s": BATCH / med, "speedup_vs_padded": padded / med, "first_loss": firsts[chunk]}
        doc["cases"].append(case)
        tol = 2e-2 if dtype == "bfloat16" else 1e-4
        for chunk in PEERS:
            assert abs(firsts[chunk] - firsts[None]) <= tol * max(1.0, abs(firsts[None])), (chunk, firsts)

    doc["ceiling"]["end"] = protocol.measure_ceiling(threads)
    doc["load_end"] = bc.load_snapshot()
    protocol.judge_noise(doc)
    name = f"length-chunks-{bc.machine_id('cpu')}{'-noisy' if doc['noisy'] else ''}.json"
    path = os.path.join(HERE, "results", name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    for case in doc["cases"]:
        print(case["dtype"], {k: (round(v["median_s"], 3), round(v["speedup_vs_padded"], 2))
                              for k, v in case["peers"].items()})
    print(f"results: {path}; ceiling moved {doc['ceiling_moved']}; noisy {doc['noisy']}")
