"""pmedit.hooks.Trace: recording, early stop, output edits, tuple outputs, hook cleanup."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pmedit.hooks import Trace, run_until
from pmedit.models import ModelSpec


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _n_hooks(model: nn.Module) -> int:
    """Trace's hooks left on the model (transformers registers hooks of its own, not counted)."""
    return sum(
        "Trace." in getattr(h, "__qualname__", "")
        for m in model.modules()
        for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
    )


def test_hook_counter_sees_live_hooks(tiny_llama):
    with Trace(tiny_llama, ["model.layers.0", "lm_head"]):
        assert _n_hooks(tiny_llama) == 2
    assert _n_hooks(tiny_llama) == 0


@pytest.fixture
def llama(tiny_llama):
    return tiny_llama, ModelSpec.from_model(tiny_llama), torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def test_records_inputs_and_outputs(llama):
    model, spec, x = llama
    names = [spec.down_proj_name(1), spec.layer_name(2)]
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        with Trace(model, names, retain_input=True, retain_output=True) as tr:
            out = model(x)
    assert torch.equal(out.logits, ref.logits)  # watching changes nothing
    down = spec.down_proj(model, 1)
    k = tr.inputs[spec.down_proj_name(1)]
    assert k.shape == (2, 9, spec.intermediate_size)
    assert torch.equal(tr.outputs[spec.down_proj_name(1)], down(k))
    # hidden_states[i + 1] is the output of layer i (all but the last layer, which is normed)
    assert torch.equal(tr.outputs[spec.layer_name(2)], ref.hidden_states[3])
    assert torch.equal(tr.inputs[spec.layer_name(2)], ref.hidden_states[2])
    assert _n_hooks(model) == 0


def test_stop_ends_the_pass_after_the_last_module(llama):
    model, spec, x = llama
    later = []
    handle = spec.layer(model, 3).register_forward_hook(lambda *a: later.append(1))
    try:
        with torch.no_grad(), Trace(model, [spec.layer_name(2), spec.down_proj_name(0)], retain_output=True, stop=True) as tr:
            assert tr.run(x) is None
            after_run = True  # run() swallows the stop, so the block goes on
        assert after_run and tr.stopped and later == []
        assert set(tr.outputs) == {spec.layer_name(2), spec.down_proj_name(0)}
        # Without run(): the stop ends the with block itself, silently.
        reached = False
        with torch.no_grad(), Trace(model, spec.layer_name(1), stop=True):
            model(x)
            reached = True
        assert not reached and later == []
        # without stop the pass goes all the way
        with torch.no_grad(), Trace(model, spec.layer_name(1)) as tr2:
            assert tr2.run(x) is not None
        assert later == [1] and not tr2.stopped
    finally:
        handle.remove()
    assert _n_hooks(model) == 0


def test_run_until_helper(llama):
    model, spec, x = llama
    with torch.no_grad():
        tr = run_until(model, spec.down_proj_name(1), x)
    assert tr.stopped and tr.inputs[spec.down_proj_name(1)].shape[-1] == spec.intermediate_size


def test_edit_output_adds_delta_downstream(llama):
    model, spec, x = llama
    delta = torch.randn(spec.hidden_size, generator=torch.Generator().manual_seed(1))
    seen = []

    def add(name, out):
        seen.append(name)
        assert torch.is_tensor(out)
        return out + delta

    with torch.no_grad():
        with Trace(model, spec.layer_name(1), retain_output=True) as clean:
            base = model(x).logits
        with Trace(model, spec.layer_name(1), retain_output=True, edit_output=add) as ed, \
                Trace(model, spec.layer_name(2), retain_input=True) as nxt:
            edited = model(x).logits
    assert seen == [spec.layer_name(1)]
    torch.testing.assert_close(ed.outputs[spec.layer_name(1)], clean.outputs[spec.layer_name(1)] + delta, rtol=0, atol=0)
    assert torch.equal(nxt.inputs[spec.layer_name(2)], ed.outputs[spec.layer_name(1)])
    assert not torch.allclose(edited, base)
    with torch.no_grad(), Trace(model, spec.layer_name(1), edit_output=lambda n, o: o):
        assert torch.equal(model(x).logits, base)  # an identity edit is exact


def test_edit_output_carries_gradients(llama):
    """Value optimisation trains a δ added to a layer output: the gradient must reach it."""
    model, spec, x = llama
    delta = torch.zeros(spec.hidden_size, requires_grad=True)
    with Trace(model, spec.layer_name(2), edit_output=lambda n, o: o + delta):
        loss = model(x).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


class _TupleLayer(nn.Module):
    """Mimics older transformers decoder layers: returns (hidden, extra)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, h):
        return self.lin(h), "attn-weights"


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_TupleLayer(), _TupleLayer()])

    def forward(self, h):
        extras = []
        for layer in self.layers:
            h, extra = layer(h)
            extras.append(extra)
        return h, extras


def test_tuple_outputs_are_handled():
    torch.manual_seed(0)
    net = _TupleNet()
    h = torch.randn(3, 4)
    with torch.no_grad():
        base, _ = net(h)
        with Trace(net, "layers.0", retain_output=True, edit_output=lambda n, o: o * 2) as tr:
            out, extras = net(h)
        ref = net.layers[1](net.layers[0](h)[0] * 2)[0]
    assert torch.is_tensor(tr.outputs["layers.0"])
    assert torch.equal(out, ref) and extras == ["attn-weights", "attn-weights"]


def test_hooks_removed_on_error(llama):
    model, spec, x = llama
    with pytest.raises(RuntimeError, match="boom"):
        with Trace(model, spec.layer_name(0), retain_output=True):
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0

    def bad(name, out):
        raise KeyError("inside edit")

    with pytest.raises(KeyError, match="inside edit"):
        with torch.no_grad(), Trace(model, spec.layer_name(0), edit_output=bad):
            model(x)
    assert _n_hooks(model) == 0
    with pytest.raises(TypeError, match="returned None for module 'model.layers.0'"):
        with torch.no_grad(), Trace(model, spec.layer_name(0), edit_output=lambda n, o: None):
            model(x)
    assert _n_hooks(model) == 0


def test_nested_traces_stop_only_their_own(llama):
    model, spec, x = llama
    with torch.no_grad(), Trace(model, spec.layer_name(3), retain_output=True) as outer:
        with Trace(model, spec.layer_name(1), retain_output=True, stop=True) as inner:
            inner.run(x)
        assert spec.layer_name(3) not in outer.outputs  # the inner stop cut the pass short
        model(x)
    assert spec.layer_name(3) in outer.outputs and inner.stopped
    assert _n_hooks(model) == 0


def test_bad_arguments(llama):
    model, spec, _ = llama
    with pytest.raises(ValueError, match="no submodule named 'model.layers.17'"):
        Trace(model, "model.layers.17")
    with pytest.raises(ValueError, match="at least one"):
        Trace(model, [])
    with pytest.raises(ValueError, match="duplicate"):
        Trace(model, [spec.layer_name(0), spec.layer_name(0)])
    with pytest.raises(TypeError, match="callable"):
        Trace(model, spec.layer_name(0), edit_output=3)
    tr = Trace(model, spec.layer_name(0))
    with pytest.raises(RuntimeError, match="inside"):
        tr.run(torch.zeros(1, 2, dtype=torch.long))
