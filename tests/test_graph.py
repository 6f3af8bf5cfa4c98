import pytest
import torch

from autodfp.errors import AutoDFPError
from autodfp.graph import ChannelGraph
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
    assert any(g.name == "blocks.5.conv.6" and "residual" in g.reason for g in graph.excluded)


def test_vgg_every_conv_is_a_group_and_the_last_feeds_the_classifier():
    model, spec, graph = graph_of("vgg16_bn")
    assert len(graph.groups) == 13 and not graph.excluded
    graph.prune("features.40", torch.arange(100))
    assert model.classifier.in_features == 100
    assert model(spec.example_input(2)).shape == (2, 10)
