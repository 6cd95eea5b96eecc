"""``parse_detr_moe_settings``: the ``moe`` entry of the DETR-family detectors, checked without
building anything; every bad value fails naming its ``moe.<key>`` and what is allowed."""
import pytest

from himoe_plugin.core import MoEConfigError
from himoe_plugin.mmdet.detr_settings import DEFAULT_LOSSES, parse_detr_moe_settings

ROUTER = dict(num_experts=8, top_k=2, num_groups=4, scene_top_k=2)


def parse(num_encoder_layers=3, num_decoder_layers=2, **moe):
    return parse_detr_moe_settings({'router': ROUTER, **moe}, num_encoder_layers,
                                   num_decoder_layers)


def test_defaults_make_every_layer_moe_with_the_documented_losses_and_copy_upcycling():
    settings = parse()
    assert settings.layers == {'encoder': (0, 1, 2), 'decoder': (0, 1)}
    assert settings.router == ROUTER
    assert settings.losses == DEFAULT_LOSSES
    assert settings.owner_settings == dict(shared_expert=False, shared_expert_weight=0.5)
    assert (settings.upcycle_mode, settings.upcycle_noise_std, settings.stats_period) == ('copy', 0.0, 50)
    assert settings.expert_channels_of(feedforward_channels=1024, num_experts=8) == 1024


def test_layer_lists_are_sorted_and_deduplicated_and_losses_can_be_disabled():
    settings = parse(encoder_layers=[2, 0, 2], decoder_layers=(), loss_router_z=None,
                     expert_channels=64)
    assert settings.layers == {'encoder': (0, 2), 'decoder': ()}
    assert settings.losses['loss_router_z'] is None
    assert settings.expert_channels_of(feedforward_channels=1024, num_experts=8) == 64


def test_split_upcycling_gives_experts_a_slice_of_the_ffn():
    settings = parse(upcycle=dict(mode='split', noise_std=0.1))
    assert (settings.upcycle_mode, settings.upcycle_noise_std) == ('split', 0.1)
    assert settings.expert_channels_of(feedforward_channels=1024, num_experts=8) == 128
    with pytest.raises(MoEConfigError, match=r"^moe\.upcycle\.mode='split': feedforward_channels=1024 "
                                             r"is not divisible by num_experts=6"):
        settings.expert_channels_of(feedforward_channels=1024, num_experts=6)
    with pytest.raises(MoEConfigError, match=r'^moe\.expert_channels=64: split upcycling gives experts '
                                             r'of 1024 / 8 = 128 channels'):
        parse(upcycle=dict(mode='split'), expert_channels=64).expert_channels_of(1024, 8)


@pytest.mark.parametrize('moe, message', [
    # issue 16, failure 7: these were bare TypeErrors
    (dict(encoder_layers=None), r"^moe\.encoder_layers=None: must be 'all' or a list of layer indices"),
    (dict(encoder_layers=1.5), r"^moe\.encoder_layers=1\.5: must be 'all' or a list of layer indices"),
    (dict(decoder_layers=2), r"^moe\.decoder_layers=2: must be 'all' or a list of layer indices"),
    (dict(decoder_layers='last'), r"^moe\.decoder_layers='last': must be 'all' or a list"),
    (dict(encoder_layers=[0, True]), r"^moe\.encoder_layers=\[0, True\]: must be 'all' or a list"),
    (dict(router=None), r'^moe\.router=None: must be a dict of HierarchicalRouter settings'),
    (dict(router='HierarchicalRouter'),
     r"^moe\.router='HierarchicalRouter': must be a dict of HierarchicalRouter settings"),
    (dict(upcycle='split'), r"^moe\.upcycle='split': must be a dict like dict\(mode='copy'"),
    (dict(upcycle=dict(mode='copy', std=0.1)), r"^moe\.upcycle=\['std'\]: unknown keys"),
    (dict(loss_balance=0.01), r'^moe\.loss_balance=0\.01: must be a loss config dict'),
    (dict(expert_channels=0), r'^moe\.expert_channels=0: must be an integer >= 1 \(or None\)'),
    (dict(expert_channels=1.5), r'^moe\.expert_channels=1\.5: must be an integer >= 1'),
    (dict(stats_period=True), r'^moe\.stats_period=True: must be an integer >= 1'),
    (dict(encoder_layers=[3]), r'^moe\.encoder_layers=\[3\]: layer indices must be in 0\.\.2'),
    (dict(decoder_layers=[-1]), r'^moe\.decoder_layers=\[-1\]: layer indices must be in 0\.\.1'),
    (dict(encoder_layers=[], decoder_layers=[]), r'^moe\.encoder_layers=\[\]: no MoE layer'),
    (dict(loss_scene=dict(type='SceneSupervisionLoss')), r'^moe\.loss_scene=.*: super-class '
                                                         r'supervision is available for RoI heads only'),
    (dict(experts=4), r'^moe\.experts=4: unknown setting; known: '),
])
def test_bad_settings_fail_naming_the_key_and_what_is_allowed(moe, message):
    with pytest.raises(MoEConfigError, match=message):
        parse(**moe)


def test_a_missing_moe_entry_fails_naming_it():
    with pytest.raises(MoEConfigError, match=r'^moe=None: must be a dict of HI-MoE settings'):
        parse_detr_moe_settings(None, 3, 3)
