"""BiPC heads on timm backbones, local weights, and the class-relationship matrix."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from omniar.uda.model import C_GRID, BiPCModel, create_backbone, relationship_matrix


@pytest.mark.parametrize("name, kwargs, size", [
    ("resnet10t", {}, 32),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2), 32),
    # Swin's features are NHWC: timm's own forward_head must do the pooling
    ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, embed_dim=16, depths=(1, 1),
                                          num_heads=(1, 1)), 32),
    ("convnext_atto", dict(dims=(8, 8, 8, 16), depths=(1, 1, 1, 1)), 32),
    # two heads (class and distillation tokens): get_classifier() is a tuple; timm averages their logits
    ("deit_small_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2), 32),
])
def test_model_keeps_pretrained_head_and_adds_task_head(name, kwargs, size):
    backbone = create_backbone(name, num_classes=7, **kwargs)
    model = BiPCModel(backbone, num_classes=3).eval()
    x = torch.randn(2, 3, size, size)
    task, pre, feats = model(x)
    assert task.shape == (2, 3) and pre.shape == (2, 7) and feats.shape == (2, backbone.num_features)
    assert torch.allclose(pre, backbone(x), atol=1e-5)  # the pre-trained head is the backbone's own classifier
    model.train()(x)[1].sum().backward()  # and trains (BiPC's passes run in training mode)


def test_detached_task_input_trains_task_head_only():
    model = BiPCModel(create_backbone("resnet10t", num_classes=5), num_classes=3)
    task, _, _ = model(torch.randn(4, 3, 32, 32), detach_task_input=True)
    task.square().sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.task_head[-1].weight.grad.abs().sum() > 0


def test_local_timm_weights_load(tmp_path):
    source = timm.create_model("resnet10t", num_classes=5)
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    loaded = create_backbone("resnet10t", weights=file, num_classes=5)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    fresh = create_backbone("resnet10t", num_classes=5)  # without weights: a different initialisation
    assert not torch.equal(fresh.fc.weight, source.fc.weight)
    with pytest.raises(ValueError, match="weights"):
        create_backbone("resnet10t", weights=tmp_path / "missing.safetensors")


def test_bad_backbone_arguments():
    with pytest.raises(ValueError, match="backbone.*unknown timm model"):
        create_backbone("resnet_does_not_exist")
    with pytest.raises(ValueError, match="pre-trained classifier head"):
        BiPCModel(create_backbone("resnet10t", num_classes=0), num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        BiPCModel(create_backbone("resnet10t", num_classes=4), num_classes=1)


def test_relationship_matrix_rows_are_distributions_and_find_the_mapping():
    # 4 pre-trained classes; task class 0 looks like pre-trained 0/1, task class 1 like 2/3
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    logits = rng.normal(0, 1, (120, 4))
    logits[np.arange(120), 2 * labels + rng.integers(0, 2, 120)] += 4
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    e = relationship_matrix(probs, labels, num_classes=2, c_grid=(1e2, 1.0, 1e-2))
    assert e.shape == (2, 4) and (e >= 0).all()
    np.testing.assert_allclose(e.sum(1), 1.0, atol=1e-9)
    assert e[0, :2].sum() > 0.8 and e[1, 2:].sum() > 0.8
    with pytest.raises(ValueError, match="labels"):
        relationship_matrix(probs, np.zeros(120, int), num_classes=2)
    with pytest.raises(ValueError, match="pretrained_probs"):
        relationship_matrix(probs[:10], labels, num_classes=2)


def test_relationship_matrix_searches_the_half_decade_grid_by_default(monkeypatch):
    import sklearn.linear_model

    tried, real = [], sklearn.linear_model.LogisticRegression
    monkeypatch.setattr(sklearn.linear_model, "LogisticRegression",
                        lambda C, **kw: tried.append(C) or real(C=C, **kw))
    rng = np.random.default_rng(1)
    probs, labels = rng.dirichlet(np.ones(3), 40), np.repeat([0, 1], 20)
    relationship_matrix(probs, labels, num_classes=2)
    assert tried == list(C_GRID) and len(tried) == 17 and tried[:3] == [1e4, 3e3, 1e3] and tried[-1] == 1e-4
    with pytest.raises(ValueError, match="^c_grid: "):
        relationship_matrix(probs, labels, num_classes=2, c_grid=(1.0, -1.0))
