import pytest
import torch

from autodfp.errors import AutoDFPError
from autodfp.compress.graph import ChannelGraph
from autodfp.models import build_model


def graph_of(name):
    model, spec = build_model(name, pretrained=False)
    return model, spec, ChannelGraph(model, spec.example_input())


def test_resnet_groups_are_the_block_internal_channels():
    model, _, graph = graph_of("resnet56")
    expected = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)]
    assert list(graph.groups) == expected
    group = graph.groups["layer2.4.conv1"]
    assert group.bn is model.layer2[4].bn1
    assert group.consumers == {"layer2.4.conv2": model.layer2[4].conv2}
    assert group.consumer_bn["layer2.4.conv2"] is model.layer2[4].bn2
    # The residual stream (stem + every conv2, through option-A pads) is excluded, with a reason.
    assert [g.name for g in graph.excluded] == ["conv1"]
    assert "residual-coupled" in graph.excluded[0].reason
    with pytest.raises(AutoDFPError, match="residual-coupled"):
        graph.group("conv1")


def test_pruning_a_group_shrinks_producer_bn_and_consumer():
    model, spec, graph = graph_of("resnet20")
    graph.prune("layer3.1.conv1", torch.tensor([0, 5, 63]))
    block = model.layer3[1]
    assert block.conv1.out_channels == 3 and block.bn1.num_features == 3
    assert block.conv2.in_channels == 3 and block.conv2.weight.shape[1] == 3
    assert model(spec.example_input(2)).shape == (2, 10)


def test_mobilenetv2_depthwise_follows_its_producer():
    model, spec, graph = graph_of("mobilenetv2")
    group = graph.groups["blocks.4.conv.0"]
    assert group.depthwise == ["blocks.4.conv.3"] and not group.reconstructable
    graph.prune("blocks.4.conv.0", torch.arange(0, 192, 2))
    dw = model.blocks[4].conv[3]
    assert dw.in_channels == dw.out_channels == dw.groups == 96
    assert model.blocks[4].conv[6].in_channels == 96
    assert model(spec.example_input(2)).shape == (2, 10)
    # Residual stage outputs are coupled and left alone.
    assert any("blocks.5.conv.6" in g.reason and "residual" in g.reason for g in graph.excluded)


def test_vgg_every_conv_is_a_group_and_the_last_feeds_the_classifier():
    model, spec, graph = graph_of("vgg16_bn")
    assert len(graph.groups) == 13 and not graph.excluded
    graph.prune("features.40", torch.arange(100))
    assert model.classifier.in_features == 100
    assert model(spec.example_input(2)).shape == (2, 10)


def test_coupled_groups_prune_every_member_of_the_add():
    model, spec = build_model("mobilenetv2", pretrained=False)
    graph = ChannelGraph(model, spec.example_input(), coupled=True)
    group = graph.groups["blocks.1.conv.6"]  # the projections of a residual stage
    assert list(group.coupled) == ["blocks.1.conv.6", "blocks.2.conv.6"]
    assert not group.reconstructable and group.selection_weight().shape[0] == group.channels
    graph.prune("blocks.1.conv.6", torch.arange(10))
    assert all(m.out_channels == 10 for m in group.coupled.values())
    assert all(m.in_channels == 10 for m in group.consumers.values())
    assert model(spec.example_input(2)).shape == (2, 10)
    # option A ties widths through a zero-pad: excluded even with coupled=True, and said why
    _, resnet_spec, _ = graph_of("resnet20")
    resnet = ChannelGraph(build_model("resnet20", pretrained=False)[0],
                          resnet_spec.example_input(), coupled=True)
    assert [g.name for g in resnet.excluded] == ["conv1"]
    assert "zero-pad shortcut" in resnet.excluded[0].reason


def test_coupled_mean_compensation_is_exact_for_constant_channels(tmp_path):
    """A cut coupled channel whose every producer's BN output is constant (gamma 0) carries
    only its mean: folding the mean into the 1x1 consumers reproduces the unpruned outputs."""
    from autodfp.pipeline import apply_strategy
    from autodfp.strategy import LayerAction, Strategy

    model, spec = build_model("mobilenetv2", pretrained=False)
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.bias.data.normal_()
    group = ChannelGraph(model, spec.example_input(), coupled=True).groups["blocks.1.conv.6"]
    weakest = group.selection_weight().abs().flatten(1).sum(1).argsort()[:8]  # L1 cuts these
    for bn in group.coupled_bn.values():
        bn.weight.data[weakest] = 0.0
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x = spec.example_input(2)

    def consumer_output(net):  # the BN after a consumer of the cut channels
        seen = []
        handle = net.blocks[3].conv[1].register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            net.eval()(x)
        handle.remove()
        return seen[0]

    reference = consumer_output(model)
    outputs = {}
    for mean in (True, False):
        strategy = Strategy("mobilenetv2", {"blocks.1.conv.6": LayerAction(16 / 24)},
                            checkpoint=str(tmp_path / "w.pt"), coupled=True)
        strategy.options = type(strategy.options)(coupled_mean=mean)
        pruned = apply_strategy(strategy)
        assert pruned.channels["blocks.1.conv.6"] == 16
        outputs[mean] = consumer_output(pruned.model)
    assert torch.allclose(outputs[True], reference, atol=1e-4)
    assert not torch.allclose(outputs[False], reference, atol=1e-2)
