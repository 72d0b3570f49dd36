"""The packed forward pass (models/packed/) and its C attention kernel, against the models'
own forward passes and torch's attention."""

from __future__ import annotations

import pytest

from models.batcher import BatchLimits


def _attention_paths() -> list:
    """The packed pass's attention paths for short rows here: torch's operations (None), and
    the C kernel where it is built and the CPU has AVX-512."""
    from models.packed import attention_kernel

    return [None] + [kernel for kernel in [attention_kernel()] if kernel is not None]


def _has_avx512() -> bool:
    import platform

    if platform.machine() != "x86_64":
        return False
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " avx512f " in f"{line} " for line in f)


def test_the_attention_kernel_is_built_where_the_cpu_can_run_it() -> None:
    """The kernel is an optional part of the install (it goes on without a C compiler), so
    a failed build would pass unseen but for this: on x86-64 with AVX-512 it must load."""
    from models.packed import attention_kernel

    if not _has_avx512():
        assert attention_kernel() is None
        return
    assert attention_kernel() is not None, (
        "models/_packed_attention.c was not built: pip install -e . with a C compiler"
    )


@pytest.mark.parametrize(("heads", "size"), [(12, 32), (3, 16), (2, 64), (1, 128)])
def test_the_attention_kernel_equals_torchs_attention(heads: int, size: int) -> None:
    """models/_packed_attention.c against softmax(Q K^T * scale) V per row in torch, on rows
    of 1 to 64 tokens (whole, partial and single 16-lane blocks), on one thread and two; and
    what it refuses it refuses whole."""
    import torch

    from models.packed import Batch, attention_kernel

    kernel = attention_kernel()
    if kernel is None:
        pytest.skip("the attention kernel is not built here or the CPU has no AVX-512")
    torch.manual_seed(heads * size)
    lengths = [1, 2, 15, 16, 17, 33, 47, 64, 5]
    batch, hidden = Batch.of(lengths), heads * size
    qkv = torch.randn(sum(lengths), 3 * hidden) * 2
    scaling = size**-0.5
    expected = torch.empty(sum(lengths), hidden)
    for start, n in zip(batch.starts.tolist(), lengths):
        q, k, v = qkv[start : start + n].view(n, 3, heads, size).permute(1, 2, 0, 3)
        attention = torch.softmax(q @ k.transpose(-1, -2) * scaling, -1) @ v  # [heads, n, size]
        expected[start : start + n] = attention.transpose(0, 1).reshape(n, hidden)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.testing.assert_close(kernel(qkv, batch, heads, size, scaling), expected, atol=2e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="refused"):
        kernel(torch.randn(65, 3 * hidden), Batch.of([65]), heads, size, scaling)
    with pytest.raises(RuntimeError, match="refused"):
        kernel(torch.randn(4, 3 * 24), Batch.of([4]), 1, 24, scaling)
    # which models get it: head sizes of whole 16-lane blocks up to 128 (BERT-base: 64)
    assert [n for n in (8, 16, 24, 32, 64, 96, 128, 144, 256) if kernel.takes_head_size(n)] == [16, 32, 64, 96, 128]


def test_the_packed_forward_pass_equals_the_padded_one(minilm_path: str) -> None:
    """models/packed/ against the model's own forward pass and pooling, on rows of very
    different lengths (so most of the padded grid is padding), in every pooling mode."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from models.packed import MATMUL_ATTENTION_WIDTH, PackedBert, available_linears, unpack
    from models.pooling import PoolingConfig, pool

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    texts = ["a", "naïve café — 日本語のテキスト 🚀", "  extra   spaces  ", " ".join(["word"] * 200)]
    encoded = tokenizer(texts, truncation=True, max_length=256)
    items = [{k: encoded[k][i] for k in ("input_ids", "token_type_ids")} for i in range(len(texts))]
    padded = tokenizer.pad({"input_ids": encoded["input_ids"]}, return_tensors="pt")

    with torch.inference_mode():
        before = model(**padded)[0]
    packed = PackedBert.for_model(model)
    assert packed is not None
    # Q, K and V fused into one matrix, which the model's own layers now view: not held twice
    query = model.encoder.layer[0].attention.self.query.weight
    assert query.untyped_storage().data_ptr() == packed.qkv[0][0].untyped_storage().data_ptr()
    with torch.inference_mode():
        assert torch.equal(model(**padded)[0], before)
    for gemm in available_linears():
        packed.use(gemm)
        worst = packed.matches(items, dict(padded), atol=1e-5)
        assert worst is not None and worst > 0, gemm  # a real comparison, within float32 rounding
    packed.use("torch")
    # the short rows alone: their attention takes the C kernel where built, else torch's
    # unfused path (the long row above, torch's fused kernel); both are checked
    short = [item for item in items if len(item["input_ids"]) <= MATMUL_ATTENTION_WIDTH]
    assert 2 <= len(short) < len(items) and max(len(item["input_ids"]) for item in items) > MATMUL_ATTENTION_WIDTH
    short_padded = tokenizer.pad({"input_ids": [item["input_ids"] for item in short]}, return_tensors="pt")
    for kernel in _attention_paths():
        packed.kernel = kernel
        worst = packed.matches(short, dict(short_padded), atol=1e-5)
        assert worst is not None and worst > 0, kernel

    hidden, lengths = packed.hidden_states(items)
    assert lengths == [len(ids) for ids in encoded["input_ids"]] and hidden.shape[0] == sum(lengths)
    ours, mask = unpack(hidden, lengths)
    assert torch.equal(mask, padded["attention_mask"])
    with torch.inference_mode():
        theirs = model(**padded)[0]
    for config in (
        PoolingConfig(),
        PoolingConfig(cls=True, mean=False),
        PoolingConfig(mean=False, max=True),
        PoolingConfig(mean=False, mean_sqrt_len=True),
        PoolingConfig(mean=False, last_token=True),
        PoolingConfig(cls=True, mean=True, max=True),
    ):
        expected = pool(config, theirs, padded["attention_mask"])
        torch.testing.assert_close(pool(config, ours, mask), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["reranker", "ner", "sentiment"])
def test_the_packed_classifier_heads_equal_the_models_own(task: str, test_models: dict[str, str]) -> None:
    """The sequence classifier (its last layer for the first token only) and the token
    classifier, packed, on every GEMM library here, against the model's own forward pass:
    rows of very different lengths, and for the reranker pairs with a truncated document."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    from models.packed import MATMUL_ATTENTION_WIDTH, PackedBert, available_linears

    path = test_models[task]
    tokenizer = AutoTokenizer.from_pretrained(path)
    cls = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path).eval()
    texts = ["a", "naïve café — 日本語のテキスト 🚀", "  extra   spaces  ", " ".join(["word"] * 600)]
    if task == "reranker":
        encoded = tokenizer(["which café?"] * len(texts), texts, truncation="only_second", max_length=512)
    else:
        encoded = tokenizer(texts, truncation=True, max_length=512)
    items = [{k: encoded[k][i] for k in ("input_ids", "token_type_ids")} for i in range(len(texts))]
    padded = dict(tokenizer.pad(dict(encoded), return_tensors="pt"))
    with torch.inference_mode():
        theirs = model(**padded).logits.numpy()

    packed = PackedBert.for_model(model)
    assert packed is not None and packed.head == ("tokens" if task == "ner" else "first")
    scale = max(1.0, float(np.abs(theirs).max()))
    for gemm in available_linears():
        packed.use(gemm)
        ours = packed.outputs(items)
        assert len(ours) == len(texts)
        for row, (out, n) in enumerate(zip(ours, (len(ids) for ids in encoded["input_ids"]))):
            expected = theirs[row, :n] if task == "ner" else theirs[row]
            assert out.shape == expected.shape
            assert float(np.abs(out - expected).max()) <= 1e-5 * scale, (gemm, row)
        assert packed.matches(items, padded, atol=1e-5) is not None
        # the three short rows alone, on each attention path for short rows
        short = {k: v[:3, : max(len(ids) for ids in encoded["input_ids"][:3])] for k, v in padded.items()}
        assert short["input_ids"].shape[1] <= MATMUL_ATTENTION_WIDTH < padded["input_ids"].shape[1]
        for kernel in _attention_paths():
            packed.kernel = kernel
            assert packed.matches(items[:3], short, atol=1e-5) is not None, (gemm, kernel)


@pytest.mark.parametrize(
    "name",
    [
        "XLMRobertaModel",
        "XLMRobertaForSequenceClassification",
        "XLMRobertaForTokenClassification",
        "RobertaModel",
        "RobertaForSequenceClassification",
        "RobertaForTokenClassification",
    ],
)
def test_the_packed_forward_pass_serves_the_roberta_family(name: str) -> None:
    """RoBERTa and XLM-RoBERTa (bge-reranker, multilingual E5, ...): positions counted from
    the padding id, their own classification head, no token types. A small model with
    random weights against its own forward pass, on rows of 2 to 502 tokens, one of them
    holding the padding id inside its text (which RoBERTa gives the padding position)."""
    import torch
    import transformers

    from models.packed import PackedBert, available_linears

    torch.manual_seed(7)
    config_cls = transformers.XLMRobertaConfig if name.startswith("XLM") else transformers.RobertaConfig
    config = config_cls(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=520,
        pad_token_id=1,
        num_labels=3,
    )
    model = getattr(transformers, name)(config).eval()
    rows = [[0, 5, 6, 7, 2], [0, 9, 1, 11, 12, 13, 2], [0, 2], [0, *(20 + i % 50 for i in range(500)), 2]]
    ids = torch.full((len(rows), max(map(len, rows))), config.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
    packed = PackedBert.for_model(model)
    assert packed is not None
    for gemm in available_linears():
        packed.use(gemm)
        worst = packed.matches(
            [{"input_ids": row} for row in rows], {"input_ids": ids, "attention_mask": mask}, atol=1e-5
        )
        assert worst is not None, gemm
    # the check is real: a wrong position count is caught
    packed.padding_idx = 0
    assert packed.matches([{"input_ids": row} for row in rows], {"input_ids": ids, "attention_mask": mask}) is None


def test_the_packed_forward_pass_in_bfloat16_is_checked_at_bfloat16s_precision(test_models: dict[str, str]) -> None:
    """``dtype: bfloat16`` on a CPU: the packed pass is held to a tolerance of bfloat16's
    rounding (4 epsilons of the outputs' size), not float32's, and still catches a bug."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.packed import PackedBert, available_linears

    path = test_models["reranker"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16).eval()
    docs = ["a", "naïve café — 日本語のテキスト 🚀", " ".join(["word"] * 300)]
    encoded = tokenizer(["which café?"] * len(docs), docs, truncation="only_second", max_length=512)
    items = [{k: encoded[k][i] for k in ("input_ids", "token_type_ids")} for i in range(len(docs))]
    padded = dict(tokenizer.pad(dict(encoded), return_tensors="pt"))
    packed = PackedBert.for_model(model)
    assert packed is not None and packed.tolerance == 4 * torch.finfo(torch.bfloat16).eps
    checked = []
    for gemm in available_linears():
        try:
            packed.use(gemm)  # where oneDNN cannot, it fails reordering the weights
            worst = packed.matches(items, padded)
        except RuntimeError:  # oneDNN has no bfloat16 GEMM on a CPU with neither AVX-512 nor AVX-NE-CONVERT
            assert gemm != "torch"
            continue  # the runtime passes over it the same way (test below, for float16)
        assert worst is not None and worst > 1e-4, gemm  # beyond float32's tolerance, within bfloat16's
        checked.append(gemm)
    assert "torch" in checked
    packed.use("torch")
    packed.embeddings = type(packed.embeddings)(model.config).to(torch.bfloat16).eval()  # untrained embeddings
    assert packed.matches(items, padded) is None


def test_a_float16_model_on_the_cpu_loads_and_serves(test_models: dict[str, str]) -> None:
    """oneDNN has no float16 GEMM on most CPUs: the runtime must pass over that library at
    load (not fail), and serve on another or padded."""
    from models.encoder import EncoderRuntime
    from models.options import EncoderOptions

    runtime = EncoderRuntime(
        "reranker",
        "rerank",
        test_models["reranker"],
        "cpu",
        EncoderOptions(dtype="float16"),
        BatchLimits(),
    )
    runtime.load()
    try:
        assert runtime.packed is None or runtime.packed.linear in ("torch", "onednn")
        half, _ = runtime.rerank("which fox?", ["The quick brown fox.", "A lazy dog."])
    finally:
        runtime.close()
    full = EncoderRuntime("reranker", "rerank", test_models["reranker"], "cpu", EncoderOptions(), BatchLimits())
    full.load()
    try:
        exact, _ = full.rerank("which fox?", ["The quick brown fox.", "A lazy dog."])
    finally:
        full.close()
    assert max(abs(a - b) for a, b in zip(half, exact)) < 0.02


def test_the_packed_forward_pass_keeps_the_faster_gemm_library(minilm_path: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    from models.packed import PackedBert, available_linears
    from models.packed import bert as packed_mod

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    packed = PackedBert.for_model(AutoModel.from_pretrained(minilm_path).eval(), "auto")
    assert packed is not None and packed.linear == "torch"  # until tuned
    encoded = tokenizer(["a short one", "and another, a little longer than that"])
    items = [{"input_ids": ids} for ids in encoded["input_ids"]]
    packed_mod._TUNED.pop(packed.shape, None)
    fastest = packed.tune(items, rounds=2)
    assert set(fastest) == set(available_linears()) and all(ms > 0 for ms in fastest.values())
    assert packed.linear == min(fastest, key=fastest.__getitem__)
    assert packed.tune(items) is fastest  # a second model of this shape: the same choice, not timed again
    with pytest.raises(ValueError, match="not available"):
        packed.use("cublas")


def test_the_packed_attention_grid_zeroes_its_padding_and_reads_back_the_tokens() -> None:
    import torch

    from models.packed import Batch

    batch = Batch.of([3, 1, 2])
    packed = torch.arange(1, 7, dtype=torch.float32).unsqueeze(1).repeat(1, 2)  # tokens 1..6
    # the grid starts uninitialised: free a block of its size full of NaNs first, which
    # the allocator hands out again, so the padding comes out as zeros only if it is zeroed
    garbage = torch.full((9, 2), float("nan"))
    del garbage
    grid = batch.to_grid(packed)
    expected = torch.tensor([1, 2, 3, 4, 0, 0, 5, 6, 0], dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    assert torch.equal(grid, expected)
    assert torch.equal(batch.from_grid(grid), packed)
    assert torch.equal(Batch.of([2, 2]).to_grid(packed[:4]), packed[:4])  # no padding at all


def test_the_packed_forward_pass_is_only_for_the_models_it_reimplements() -> None:
    from transformers import DistilBertConfig, DistilBertModel

    from models.packed import PackedBert

    tiny = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    assert PackedBert.for_model(tiny) is None
