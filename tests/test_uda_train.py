"""UDA runs on a tiny generated image-folder pair, the CLI, SIGTERM, and clear errors for bad domains."""

import argparse
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import assert_bitwise_equal
from PIL import Image

from omniar.cli import main as omniar_main
from omniar.train.engine import TrainEngine
from omniar.uda import train as uda
from omniar.uda.data import load_domain
from omniar.uda.train import UDAConfig, add_cli_arguments, check_domains, cli_main, train_uda

CLASSES = ("circle", "square")


def make_domain(root, shift, per_class=6, classes=CLASSES):
    """Bright blob (class 0) or dark blob (class 1) on a noisy background; ``shift`` changes the background."""
    rng = np.random.default_rng(int(shift * 10))
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (16, 16, 3)) + int(shift * 100)
            img[4:12, 4:12] = 230 if c == 0 else 20
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("uda")
    return make_domain(root / "src", 0.0), make_domain(root / "tgt", 0.8)


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return cli_main(parser.parse_args(list(argv)))


def model_states(run, step):
    """The module weights and buffers of a run's checkpoint after ``step`` steps."""
    path = run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def count_steps(monkeypatch):
    """Record each ``backward_step`` (the module's weights before it) in the returned list."""
    original, states = TrainEngine.backward_step, []

    def counted(self, loss):
        states.append({k: v.detach().clone() for k, v in self.module.named_parameters()})
        return original(self, loss)

    monkeypatch.setattr(TrainEngine, "backward_step", counted)
    return states


def test_bipc_run_caches_relation_and_resumes(domains, tmp_path, capsys, monkeypatch):
    src, tgt = domains
    out = tmp_path / "run"
    common = ["--source", str(src), "--target", str(tgt), "--backbone", "resnet10t", "--pretrained-classes", "5",
              "--image-size", "16", "--batch-size", "4", "--steps-per-epoch", "2", "--out", str(out)]
    assert run_cli(*common, "--method", "bipc", "--epochs", "2") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["per_epoch"]) == 2 and result["last_epoch_acc"] == result["per_epoch"][-1]
    assert result["best_epoch_acc"] == max(result["per_epoch"])
    relation = np.load(out / "relationship.npy")
    assert relation.shape == (2, 5)
    np.testing.assert_allclose(relation.sum(1), 1.0, atol=1e-6)
    assert (out / "tb").is_dir() and (out / "checkpoints").is_dir()
    # a third epoch resumes from the step-4 checkpoint: its weights, two more steps, the first two epochs'
    # history; and it reads the cached relation (a different valid one here) instead of learning it again
    cached = np.eye(2, 5, dtype=relation.dtype) / 2 + 0.1
    np.save(out / "relationship.npy", cached)
    monkeypatch.setattr(uda, "relationship_matrix", lambda *a, **k: pytest.fail("relation learned again"))
    real_cpa, used = uda.cpa_loss, []  # the relation each step trains with: cpa_loss's fifth argument
    monkeypatch.setattr(uda, "cpa_loss", lambda *a: used.append(a[4].cpu()) or real_cpa(*a))
    steps = count_steps(monkeypatch)
    assert run_cli(*common, "--method", "bipc", "--epochs", "3") == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["per_epoch"][:2] == result["per_epoch"] and len(resumed["per_epoch"]) == 3
    assert len(steps) == 2
    weights = model_states(out, 4)
    assert_bitwise_equal({k: weights[k] for k in steps[0]}, steps[0])
    assert len(used) == 2 and all(torch.equal(r, torch.as_tensor(cached, dtype=torch.float32)) for r in used)
    np.save(out / "wrong.npy", np.full((5, 2), 0.5))
    cfg = UDAConfig(backbone="resnet10t", pretrained_classes=5, epochs=1, steps_per_epoch=1, batch_size=4,
                    relation_cache=str(out / "wrong.npy"), out_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"^relation_cache: .*wrong\.npy holds shape \(5, 2\), expected \(2, 5\)"):
        train_uda(cfg, load_domain(src, 16), load_domain(tgt, 16))


@pytest.mark.parametrize("method", ["source_only", "dann"])
def test_baselines_run(domains, tmp_path, method):
    src, tgt = (load_domain(d, 16) for d in domains)
    cfg = UDAConfig(method=method, backbone="resnet10t", pretrained_classes=5, epochs=1, steps_per_epoch=2,
                    batch_size=4, out_dir=str(tmp_path))
    result = train_uda(cfg, src, tgt)
    assert len(result["per_epoch"]) == 1 and 0.0 <= result["last"] <= 100.0


def test_sigterm_mid_epoch_saves_and_returns_then_resumes(domains, tmp_path, monkeypatch):
    src, tgt = (load_domain(d, 16, augment=True) for d in domains)  # random crops and flips must resume too
    config = dict(method="source_only", backbone="resnet10t", pretrained_classes=5, epochs=2, steps_per_epoch=2,
                  batch_size=4)
    straight = train_uda(UDAConfig(**config, out_dir=str(tmp_path / "straight")), src, tgt)
    cfg = UDAConfig(**config, out_dir=str(tmp_path / "run"))
    original = TrainEngine.backward_step
    calls = []

    def sigterm_in_step_3(self, loss):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill <pid>` sends
        return original(self, loss)

    monkeypatch.setattr(TrainEngine, "backward_step", sigterm_in_step_3)
    stopped = train_uda(cfg, src, tgt)
    assert len(calls) == 3 and stopped["stopped_at"] == 3 and len(stopped["per_epoch"]) == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    resumed = train_uda(cfg, src, tgt)  # from step 3: only step 4 runs, ending where the straight run did
    assert len(calls) == 4 and resumed["per_epoch"] == straight["per_epoch"]
    assert_bitwise_equal(model_states(tmp_path / "straight", 4), model_states(tmp_path / "run", 4))


def test_list_file_domain(domains, tmp_path):
    src, _ = domains
    lines = [f"{p.relative_to(src)} {CLASSES.index(p.parent.name)}" for p in sorted(src.rglob("*.png"))]
    (src / "list.txt").write_text("\n".join(lines) + "\n")
    data = load_domain(src / "list.txt", 16)
    assert len(data) == 12 and data.classes == ["0", "1"] and data[0][0].shape == (3, 16, 16)
    (tmp_path / "bad.txt").write_text("only_a_path.png\n")
    with pytest.raises(ValueError, match="expected 'path label'"):
        load_domain(tmp_path / "bad.txt", 16)
    (tmp_path / "gone.txt").write_text("missing.png 0\n")
    with pytest.raises(ValueError, match="image not found"):
        load_domain(tmp_path / "gone.txt", 16)


def test_bad_domains_give_clear_errors(domains, tmp_path):
    src, tgt = domains
    with pytest.raises(ValueError, match="--source: not found"):
        run_cli("--source", str(tmp_path / "nope"), "--target", str(tgt), "--out", str(tmp_path / "r"))
    other = make_domain(tmp_path / "other", 0.5, per_class=2, classes=("circle", "star"))
    with pytest.raises(ValueError, match="target: classes differ"):
        check_domains(load_domain(src, 16), load_domain(other, 16))
    (tmp_path / "empty" / "circle").mkdir(parents=True)
    with pytest.raises(ValueError, match="--target: .*empty"):
        load_domain(tmp_path / "empty", 16, "--target")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_domain(tmp_path / "flat", 16)
    with pytest.raises(ValueError, match="--backbone: unknown timm model"):
        run_cli("--source", str(src), "--target", str(tgt), "--backbone", "resnet_nope", "--out", str(tmp_path / "r"))


def test_omniar_train_uda_command_reports_bad_input(domains, tmp_path, capsys):
    src, _ = domains
    rc = omniar_main(["train", "uda", "--source", str(src), "--target", str(tmp_path / "missing"),
                      "--out", str(tmp_path / "r")])
    assert rc == 2 and "--target: not found" in capsys.readouterr().err


@pytest.mark.parametrize("augmented", [False, True])
def test_cli_learns_the_relation_from_all_unaugmented_source_images(domains, tmp_path, monkeypatch, augmented):
    src, tgt = domains
    seen = []
    real = uda.pretrained_head_probs
    monkeypatch.setattr(uda, "pretrained_head_probs", lambda *a: seen.append(a) or real(*a))
    (tmp_path / "cfg.yaml").write_text(f"relation_logit_scale: 0.5\nrelation_augmented: {str(augmented).lower()}\n")
    assert run_cli("--source", str(src), "--target", str(tgt), "--config", str(tmp_path / "cfg.yaml"),
                   "--backbone", "resnet10t", "--pretrained-classes", "5", "--image-size", "16", "--batch-size", "4",
                   "--epochs", "1", "--steps-per-epoch", "1", "--out", str(tmp_path / "run")) == 0
    (_, data, _, limit, scale, *_), = seen
    crops = [type(t).__name__ for t in data.transform.transforms]
    assert ("RandomCrop" in crops) == augmented and len(data) == 12 and limit is None and scale == 0.5


def test_pretrained_head_probs_scale_the_logits(domains):
    from omniar.uda.model import BiPCModel, create_backbone

    torch.manual_seed(0)
    model = BiPCModel(create_backbone("resnet10t", num_classes=5), 2)
    data = load_domain(domains[0], 16)
    probs, labels = uda.pretrained_head_probs(model, data, torch.device("cpu"), limit=5, logit_scale=0.884)
    x, y = zip(*(data[i] for i in torch.randperm(12, generator=torch.Generator().manual_seed(0))[:5].tolist()))
    with torch.no_grad():
        expected = (model.eval()(torch.stack(x))[1] * 0.884).softmax(1)
    np.testing.assert_allclose(probs, expected.double().numpy(), atol=1e-6)
    assert labels.tolist() == list(y)


def test_mean_class_accuracy_for_visda_reporting():
    class AlwaysClassZero(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0, 0.0]]).expand(len(x), -1), None, None

    data = torch.utils.data.TensorDataset(torch.zeros(6, 1), torch.tensor([0, 0, 0, 0, 1, 1]))
    data.classes = ["a", "b", "c"]  # class "c" has no samples: it does not count
    cpu = torch.device("cpu")
    assert uda.evaluate(AlwaysClassZero(), data, cpu) == pytest.approx(100 * 4 / 6)
    assert uda.evaluate(AlwaysClassZero(), data, cpu, "mean_class_accuracy") == pytest.approx(50.0)
    with pytest.raises(ValueError, match="^metric: "):
        uda.evaluate(AlwaysClassZero(), data, cpu, "top5")


def test_focal_loss_option_and_reference_options_are_checked(domains, tmp_path, monkeypatch):
    calls = []
    real = uda.focal_loss
    monkeypatch.setattr(uda, "focal_loss", lambda *a: calls.append(a) or real(*a))
    src, tgt = (load_domain(d, 16) for d in domains)
    cfg = UDAConfig(method="source_only", backbone="resnet10t", pretrained_classes=5, epochs=1, steps_per_epoch=2,
                    batch_size=4, classifier_loss="focal", metric="mean_class_accuracy", out_dir=str(tmp_path))
    result = train_uda(cfg, src, tgt)
    assert len(calls) == 2 and calls[0][2] == cfg.label_smoothing and 0.0 <= result["last"] <= 100.0
    for key, value in [("classifier_loss", "bce"), ("metric", "f1"), ("cpa_regulariser_mean", "samples"),
                       ("relation_logit_scale", 0.0), ("relation_c_grid", []), ("relation_max_samples", 1),
                       ("relation_augmented", "yes")]:
        with pytest.raises(ValueError, match=f"^{key}: "):
            UDAConfig(**{key: value})


@pytest.mark.parametrize("name", ["uda_office31.yaml", "uda_visda.yaml"])
def test_shipped_configs_are_valid(name):
    from omniar.train.common import load_yaml
    from omniar.train.engine import config_from_dict

    path = Path(__file__).resolve().parents[1] / "configs" / name
    assert config_from_dict(UDAConfig, load_yaml(path), name).method == "bipc"
