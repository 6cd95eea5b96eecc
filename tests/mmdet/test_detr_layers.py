"""``MoEFFN`` and ``TokenRouting``: checkpoints of the FFN written while it was itself the
``MoEBlock`` (keys ``router.*``, ``moe.*``) load into the FFN that owns one and reproduce the
outputs saved with them; the FFN skips padding and keeps uncounted tokens out of the scene."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

FIXTURES = Path(__file__).resolve().parents[1] / 'fixtures'
sys.path.insert(0, str(FIXTURES))

from make_legacy_detr_ffn import build_ffn  # noqa: E402

from himoe_plugin.mmdet.detr_layers import MoEFFN, TokenRouting  # noqa: E402

LEGACY = torch.load(FIXTURES / 'legacy_detr_ffn.pth')


def _run(ffn, route_uncounted):
    batch, routings = LEGACY['inputs'], []
    tokens = TokenRouting.of_tokens(batch['counted'], route_uncounted, routings)
    with torch.no_grad():
        return ffn(batch['x'], tokens), routings


@pytest.mark.parametrize('owner_prefix', ['', 'encoder.layers.0.ffn.'])
def test_a_checkpoint_of_the_ffn_as_a_block_loads_and_reproduces_its_outputs(owner_prefix):
    saved = LEGACY['state_dict']
    assert any(k.startswith('router.') for k in saved) and not any('moe_block' in k for k in saved)
    torch.manual_seed(123)  # another init: everything must come from the checkpoint
    ffn = build_ffn()
    assert isinstance(ffn, MoEFFN)
    owner = ffn if not owner_prefix else nn.ModuleDict(
        {'encoder': nn.ModuleDict({'layers': nn.ModuleList([nn.ModuleDict({'ffn': ffn})])})})
    owner.load_state_dict({owner_prefix + k: v for k, v in saved.items()})  # strict
    assert torch.equal(ffn.moe_block.moe.experts.weights[0], saved['moe.experts.weights.0'])
    assert torch.equal(ffn.moe_block.router.scene_router.weight, saved['router.scene_router.weight'])
    ffn.eval()
    for name, route_uncounted in (('encoder', False), ('decoder', True)):
        out, routings = _run(ffn, route_uncounted)
        torch.testing.assert_close(out, LEGACY['outputs'][name]['output'], rtol=1e-6, atol=1e-6)
        assert torch.equal(routings[0].expert_index, LEGACY['outputs'][name]['expert_index'])
    assert ffn.upcycle_report == []  # expert keys present: nothing to upcycle


def test_the_ffn_saves_under_its_block_and_round_trips():
    torch.manual_seed(0)
    ffn = build_ffn().eval()
    state = ffn.state_dict()
    assert state and all(k.startswith('moe_block.') for k in state)
    torch.manual_seed(1)
    other = build_ffn().eval()
    other.load_state_dict(state)
    for route_uncounted in (False, True):
        torch.testing.assert_close(_run(other, route_uncounted)[0], _run(ffn, route_uncounted)[0])


def test_padding_keeps_the_residual_and_uncounted_queries_are_routed_but_not_pooled():
    torch.manual_seed(0)
    ffn = build_ffn().eval()
    x, counted = LEGACY['inputs']['x'], LEGACY['inputs']['counted']
    padded = ~counted
    out, routings = _run(ffn, route_uncounted=False)
    assert routings[0].expert_index.shape[0] == int(counted.sum())
    torch.testing.assert_close(out[padded], x[padded])  # padding: residual only
    out_dn, routings_dn = _run(ffn, route_uncounted=True)
    assert routings_dn[0].expert_index.shape[0] == counted.numel()
    assert not torch.allclose(out_dn[padded], x[padded])  # uncounted queries are computed
    torch.testing.assert_close(routings_dn[0].scene.logits, routings[0].scene.logits)
