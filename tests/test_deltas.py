"""The deltas file: bit-exact reload under cancellation, payload integrity, and continuing a
saved sequence exactly where it stopped."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from pmedit.deltas import apply_delta, read_deltas, split_delta
from pmedit.editor import Editor
from test_editor import Synthetic, _requests, _tiny_editor, _weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_split_delta_is_exact_under_cancellation(dtype):
    """W₀ and W many binades apart (W₀ = −0.0165 → W = −1.6e−7, and worse): a delta in twice the
    precision cannot hold W − W₀ exactly there, so those elements travel as fix-ups."""
    g = torch.Generator().manual_seed(0)
    W0 = (torch.randn(64, 48, generator=g, dtype=torch.float64) * 0.02).to(dtype)
    W = (W0.double() + torch.randn(64, 48, generator=g, dtype=torch.float64) * 1e-3).to(dtype)
    W[0, 0], W0[0, 0] = -1.6e-7, -0.0165
    W[1, 1], W0[1, 1] = 1e-30 if dtype != torch.float16 else 1e-7, 1.0
    W[2, 2], W0[2, 2] = -0.0, 0.0  # the sign of zero is part of the weight's bits
    delta, fix = split_delta(W0, W)
    back = apply_delta(W0, delta, fix)
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), W.view(torch.uint8))
    if dtype == torch.float16:
        return
    # the naive reload (no fix-ups) is what broke: it differs at the cancelled elements
    naive = (W0.to(delta.dtype) + delta).to(dtype)
    assert not torch.equal(naive.view(torch.uint8), W.view(torch.uint8))
    assert 0 < fix[0].numel() <= 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_exact_under_cancellation(tmp_path, dtype):
    syn = Synthetic()
    model = make_tiny_llama(seed=1).to(dtype)
    ed = _tiny_editor(model, syn, method="memit", layers=(1,))
    ed.edit(_requests(3))
    with torch.no_grad():  # an edit that cancels an original weight almost exactly
        W0 = ed._original[1]
        ed._weight(1)[0, 0] = W0[0, 0] * 2 ** -20
    edited = _weights(ed)
    path = ed.save_deltas(tmp_path / "d.safetensors")
    fresh = make_tiny_llama(seed=1).to(dtype)
    loaded = Editor.load_deltas(fresh, path, progress=False)
    assert torch.equal(loaded._weight(1).view(torch.uint8), edited[1].view(torch.uint8))


def _data_range(path, tensor):
    """(start, end) byte offsets of ``tensor``'s data in a safetensors file."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    return 8 + n + start, 8 + n + end


def test_tampered_truncated_and_old_files_are_refused(tmp_path):
    syn = Synthetic()
    ed = _tiny_editor(make_tiny_llama(seed=1), syn)
    ed.edit(_requests(2))
    path = ed.save_deltas(tmp_path / "d.safetensors")
    raw = bytearray(path.read_bytes())
    start, _ = _data_range(path, f"delta.{ed.module_names[1]}")
    flipped = bytearray(raw)
    flipped[start + 7] ^= 0x01  # the lowest exponent bit of the first fp64 delta element
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    fresh = make_tiny_llama(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"bad.safetensors: deltas file checksum mismatch"):
        Editor.load_deltas(fresh, bad)
    short = tmp_path / "short.safetensors"
    short.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match=r"short.safetensors: unreadable deltas file"):
        Editor.load_deltas(fresh, short)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_continuing_a_saved_sequence_equals_the_uninterrupted_one(tmp_path):
    """keep_prior_edits: the kept keys travel in the file, so batch 3 after a reload sees the same
    preservation matrix (the same rank updates, replayed) and writes the same weights."""
    syn = Synthetic()
    model = make_tiny_llama(seed=3)
    ed = _tiny_editor(model, syn, keep_prior_edits=True)
    ed.edit(_requests(6), batch_size=2)
    straight = _weights(ed)
    ed.restore()
    ed.edit(_requests(4), batch_size=2)
    path = ed.save_deltas(tmp_path / "seq.safetensors")
    ed.restore()
    fresh = make_tiny_llama(seed=3)
    cont = Editor.load_deltas(fresh, path, tokenizer=object(), second_moments={1: ed.second_moment(1)},
                              progress=False, context_class=syn.context_class())
    assert cont.templates == ["{}"]  # saved with the edits: continuing never regenerates them
    assert cont.n_edits == 4 and len(read_deltas(path).kept_keys[1]) == 2
    cont.edit(_requests(2, start=4), batch_size=2)
    assert torch.equal(cont._weight(1), straight[1])
    with pytest.raises(ValueError, match="other hyperparameters"):
        Editor.load_deltas(make_tiny_llama(seed=3), path, hparams=ed.hparams.replace(lam=3.0))
