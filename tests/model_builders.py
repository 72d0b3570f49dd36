"""Small test models built from the bundled MiniLM: its encoder weights and tokenizer,
with task heads initialised from a fixed seed. Real weights, real tokenizer, real heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "MISC"]  # MISC: a plain label, no B-/I-
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
TOPIC_LABELS = ["sports", "politics", "science", "art"]


def _save(model, tokenizer, path: Path) -> str:  # noqa: ANN001
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_test_models(minilm_path: str, out: Path) -> dict[str, str]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    paths: dict[str, str] = {}

    def head_init(model, std: float) -> None:  # noqa: ANN001
        head = model.classifier
        with torch.no_grad():
            head.weight.normal_(0.0, std)
            head.bias.normal_(0.0, std / 4)

    torch.manual_seed(1234)
    reranker = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=1)
    head_init(reranker, 2.0)
    paths["reranker"] = _save(reranker, tokenizer, out / "reranker")

    torch.manual_seed(1235)
    ner = AutoModelForTokenClassification.from_pretrained(
        minilm_path,
        num_labels=len(NER_LABELS),
        id2label=dict(enumerate(NER_LABELS)),
        label2id={label: i for i, label in enumerate(NER_LABELS)},
    )
    head_init(ner, 3.0)  # wide enough that labels change from token to token
    paths["ner"] = _save(ner, tokenizer, out / "ner")

    torch.manual_seed(1236)
    sentiment = AutoModelForSequenceClassification.from_pretrained(
        minilm_path,
        num_labels=3,
        id2label=dict(enumerate(SENTIMENT_LABELS)),
        label2id={label: i for i, label in enumerate(SENTIMENT_LABELS)},
    )
    head_init(sentiment, 2.0)
    paths["sentiment"] = _save(sentiment, tokenizer, out / "sentiment")

    torch.manual_seed(1237)
    topics = AutoModelForSequenceClassification.from_pretrained(
        minilm_path,
        num_labels=4,
        id2label=dict(enumerate(TOPIC_LABELS)),
        label2id={label: i for i, label in enumerate(TOPIC_LABELS)},
        problem_type="multi_label_classification",
    )
    head_init(topics, 2.0)
    paths["topics"] = _save(topics, tokenizer, out / "topics")
    return paths


TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def build_tiny_causal_lm(minilm_path: str, out: Path, chat_template: bool) -> str:
    """A small Llama-architecture LM on MiniLM's tokenizer, seeded: real code paths, fast."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _lm_tokenizer(minilm_path)
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(**_tiny_lm_shape(tokenizer), num_hidden_layers=2, tie_word_embeddings=True)
    torch.manual_seed(4321)
    model = LlamaForCausalLM(config)
    _spread(model)
    name = "tiny-lm-chat" if chat_template else "tiny-lm"
    return _save(model, tokenizer, out / name)


def build_tiny_gemma3(minilm_path: str, out: Path) -> str:
    """A small Gemma 3 (sliding-window and full attention layers, a window of 6 tokens) on
    MiniLM's tokenizer, seeded: generations run past the window within a few tokens."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = _lm_tokenizer(minilm_path)
    config = Gemma3TextConfig(
        **_tiny_lm_shape(tokenizer),
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    model = Gemma3ForCausalLM(config)
    _spread(model)
    with torch.no_grad():  # and no end-of-text token: its generations run past the window
        model.lm_head.weight[tokenizer.sep_token_id] = 0.0
    return _save(model, tokenizer, out / "tiny-gemma3")


def _lm_tokenizer(minilm_path: str) -> Any:
    """MiniLM's tokenizer for a causal LM: [CLS] as its start, [SEP] as its end."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.bos_token = tokenizer.cls_token
    tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def _tiny_lm_shape(tokenizer: Any) -> dict[str, Any]:
    """What the tiny causal LMs share: their width, heads, context and special tokens."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _spread(model: Any) -> None:
    """A wider spread than the default init, so greedy decoding wanders instead of
    repeating one token."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
