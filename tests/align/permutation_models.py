"""Models for the permutation tests: a seeded random BERT saved as safetensors, zoo prompts,
and the outputs the function-preserved tests compare."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import transformers

from amalgam.checkpoint import Checkpoint
from amalgam.evaluate.perplexity import task_texts
from amalgam.zoo import Zoo, build_zoo
from tests.zoo.conftest import zoo_home


@cache
def tiny_zoo() -> Zoo:
    """The tiny zoo (built once, cached under $AMALGAM_HOME/zoo)."""
    return build_zoo(zoo_home(), profile="tiny", log=lambda _: None)


def bert_model(folder: Path, seed: int, *, masked_lm: bool = True, layers: int = 2) -> Path:
    """A random BERT (hidden 32, 4 heads, intermediate 48) saved with ``save_pretrained``."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    cls = transformers.BertForMaskedLM if masked_lm else transformers.BertModel
    cls(config).save_pretrained(folder)
    return folder


def qwen2_model(folder: Path, seed: int) -> Path:
    """A random Qwen2 (q/k/v biases, tied embeddings; hidden 32, 4 heads, 2 KV heads) whose
    weights are drawn large enough and biases non-zero, so every permutation shows."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "proj" in name or "embed" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


def zoo_prompt_ids(zoo: Zoo, limit: int = 4) -> list[torch.Tensor]:
    """Token ids of the first ``limit`` test prompts (with their answers) of every zoo task."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo.base)
    pairs = task_texts(zoo.tasks_dir, zoo.task_names, "test", limit)
    return [torch.tensor([tokenizer(p + c)["input_ids"]]) for p, c in pairs]


def logit_gap(a: Path, b: Path, prompts: list[torch.Tensor]) -> float:
    """The largest difference between the logits of the causal LMs at ``a`` and ``b`` on
    ``prompts`` (CPU, float32)."""
    models = [transformers.AutoModelForCausalLM.from_pretrained(f).eval() for f in (a, b)]
    with torch.inference_mode():
        return max(
            (models[0](ids).logits - models[1](ids).logits).abs().max().item() for ids in prompts
        )


def bert_hidden(folder: Path, seed: int = 0) -> torch.Tensor:
    """The last hidden states of the BERT at ``folder`` on a seeded random batch."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    ids = torch.randint(1, 60, (3, 20), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(input_ids=ids).last_hidden_state


def tensors_equal(a: Path, b: Path) -> list[str]:
    """The tensors of ``a`` that differ from ``b`` beyond float32 rounding."""
    ca, cb = Checkpoint(str(a)), Checkpoint(str(b))
    assert sorted(ca.names()) == sorted(cb.names())
    return [
        n for n in ca.names() if not torch.allclose(ca.tensor(n), cb.tensor(n), atol=1e-6, rtol=0)
    ]
