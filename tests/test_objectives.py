import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import METHOD_SPECS, METHODS, ObjectiveConfig
from pipeline.distill.head import GenerativeHead, HeadConfig
from pipeline.distill.objectives import contract_targets, feature_mixup
from pipeline.errors import GenddError
from pipeline.train.losses import class_log_prior, compute_objective, kd_loss, kl_loss, method_module, warmstart_loss

B, D_IN, D_S, D_T, C = 16, 6, 4, 8, 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _teacher(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny fixed batch: inputs, teacher features/logits, class centres (the teacher classifier) and labels."""
    g = _gen(seed)
    x = torch.randn(B, D_IN, generator=g)
    feats_t = torch.randn(B, D_T, generator=g)
    centres = torch.randn(C, D_T, generator=g)
    logits_t = feats_t @ centres.T
    labels = logits_t.argmax(dim=1)
    return {"x": x, "teacher_features": feats_t, "centres": centres, "teacher_logits": logits_t, "labels": labels}


def test_contraction_matches_the_formula_for_hard_and_soft_labels() -> None:
    data = _teacher()
    f, w, y = data["teacher_features"], data["centres"], data["labels"]
    hard = contract_targets(f, y, w, 0.7)
    expected = torch.stack([0.3 * f[i] + 0.7 * w[y[i]] for i in range(B)])
    torch.testing.assert_close(hard, expected)
    soft = contract_targets(f, F.one_hot(y, C).float(), w, 0.7)
    torch.testing.assert_close(soft, hard)
    assert contract_targets(f, None, None, 0.0) is f
    with pytest.raises(GenddError, match="needs labels"):
        contract_targets(f, None, w, 0.9)


def test_mixup_off_is_identity() -> None:
    z, y = torch.randn(5, 3), torch.randn(5, 2)
    mz, my = feature_mixup(z, y, 0.0, _gen(0))
    assert mz is z and my is y


def test_mixup_uses_one_weight_and_one_permutation_for_both() -> None:
    z = torch.eye(8)  # row i of the mixed z reveals m (its diagonal) and the partner of sample i
    y = torch.randn(8, 5)
    mz, my = feature_mixup(z, y, 1.0, _gen(3))
    m = mz.diagonal().min().item()  # rows paired with themselves have diagonal 1
    assert 0.0 < m < 1.0
    partner = (mz - m * z).argmax(dim=1)
    assert sorted(partner.tolist()) == list(range(8)) and not torch.equal(partner, torch.arange(8))
    torch.testing.assert_close(my, m * y + (1 - m) * y[partner])
    again_z, again_y = feature_mixup(z, y, 1.0, _gen(3))
    assert torch.equal(again_z, mz) and torch.equal(again_y, my)
    assert not torch.equal(feature_mixup(z, y, 1.0, _gen(4))[0], mz)


def test_kd_and_kl_losses_match_their_definitions() -> None:
    g = _gen(0)
    s, t = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    p_t = F.softmax(t / 4.0, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 4.0, dim=1))).sum(dim=1).mean()
    torch.testing.assert_close(kd_loss(s, t, y, alpha=0.5, tau=4.0), F.cross_entropy(s, y) + 0.5 * 16.0 * kl)
    torch.testing.assert_close(kd_loss(s, s, y, alpha=1.0, tau=4.0), F.cross_entropy(s, y))
    assert kl_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(s, t).item() > 0


def test_warmstart_trains_the_projection_but_not_the_teacher_classifier() -> None:
    data = _teacher()
    proj = nn.Linear(D_S, D_T)
    weight = data["centres"].clone().requires_grad_(True)
    bias = torch.zeros(C)
    feats = torch.randn(B, D_S)
    loss = warmstart_loss(feats, proj, weight, bias, data["labels"])
    torch.testing.assert_close(loss, F.cross_entropy(proj(feats) @ weight.T, data["labels"]))
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert weight.grad is None


def test_unsupervised_config_forces_zero_contraction_and_methods_are_validated() -> None:
    assert ObjectiveConfig(method="gendd_unsup").contraction == ObjectiveConfig(method="kl").contraction == 0.0
    assert ObjectiveConfig(method="gendd").contraction == 0.9
    with pytest.raises(GenddError, match="ce, kd, kl, gendd, gendd_unsup"):
        ObjectiveConfig(method="mse")


def _models(method: str) -> tuple[nn.Module, nn.Module, GenerativeHead | None]:
    torch.manual_seed(0)
    backbone, classifier = nn.Linear(D_IN, D_S), nn.Linear(D_S, C)
    head = (
        GenerativeHead(HeadConfig(feature_dim=D_T, cond_dim=D_S, token_dim=4, width=64, depth=2))
        if METHOD_SPECS[method].uses_head
        else None
    )
    return backbone, classifier, head


def _objective(
    cfg: ObjectiveConfig,
    backbone: nn.Module,
    classifier: nn.Module,
    head: nn.Module | None,
    data: dict[str, torch.Tensor | None],
    seed: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """compute_objective on the backbone's features of data["x"], with fixed random draws when seed is given."""
    inputs = {k: v for k, v in data.items() if k != "x"}
    generator = _gen(seed) if seed is not None else None
    return compute_objective(
        cfg, feats=backbone(data["x"]), classifier=classifier, head=head, generator=generator, **inputs
    )


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_on_a_tiny_batch(method: str) -> None:
    backbone, classifier, head = _models(method)
    cfg, data = ObjectiveConfig(method=method), _teacher()
    params = [*backbone.parameters(), *classifier.parameters(), *(head.parameters() if head else [])]
    opt = torch.optim.Adam(params, lr=5e-3)
    start_weight = backbone.weight.detach().clone()
    before, logs = _objective(cfg, backbone, classifier, head, data, seed=123)  # fixed draws for a fair comparison
    assert torch.isfinite(before) and logs["loss"] == pytest.approx(before.item())
    for _ in range(30):
        loss, _ = _objective(cfg, backbone, classifier, head, data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = _objective(cfg, backbone, classifier, head, data, seed=123)
    assert torch.isfinite(after) and after.item() < before.item()
    assert not torch.equal(backbone.weight, start_weight)  # the diffusion loss reaches the backbone too


class _ProbeOnlyHead(nn.Module):
    """Stands in for the head: a diffusion loss of exactly zero that carries no gradient to the backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def condition(self, h: torch.Tensor) -> torch.Tensor:
        return h.detach()

    def forward(self, target: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.scale * 0.0


def test_gendd_probe_sends_no_gradient_into_the_backbone() -> None:
    backbone, classifier, _ = _models("ce")
    loss, logs = _objective(ObjectiveConfig(method="gendd"), backbone, classifier, _ProbeOnlyHead(), _teacher())
    assert logs["diffusion"] == 0.0 and logs["probe_ce"] > 0
    loss.backward()
    assert classifier.weight.grad is not None and classifier.weight.grad.abs().sum() > 0
    assert backbone.weight.grad is None or not backbone.weight.grad.any()


def test_gendd_unsup_is_the_diffusion_loss_alone() -> None:
    backbone, classifier, head = _models("gendd_unsup")
    data = {**_teacher(), "labels": None, "centres": None, "teacher_logits": None}
    loss, logs = _objective(ObjectiveConfig(method="gendd_unsup"), backbone, classifier, head, data, seed=0)
    assert set(logs) == {"loss", "diffusion"}
    loss.backward()
    assert classifier.weight.grad is None


def test_gendd_unsup_probe_learns_the_teacher_softmax_without_touching_the_backbone() -> None:
    """With teacher logits, a label-free probe (KL) trains the classifier; the backbone still sees only diffusion."""
    backbone, classifier, _ = _models("ce")
    data = {**_teacher(), "labels": None, "centres": None}
    loss, logs = _objective(ObjectiveConfig(method="gendd_unsup"), backbone, classifier, _ProbeOnlyHead(), data)
    assert logs["diffusion"] == 0.0 and logs["probe_kl"] > 0
    loss.backward()
    assert classifier.weight.grad is not None and classifier.weight.grad.abs().sum() > 0
    assert backbone.weight.grad is None or not backbone.weight.grad.any()


@pytest.mark.parametrize(
    ("method", "drop", "message"),
    [
        ("ce", "labels", "needs labels"),
        ("kd", "labels", "labels was not given"),
        ("kd", "teacher_logits", "teacher_logits was not given"),
        ("kl", "teacher_logits", "teacher_logits was not given"),
        ("gendd", "labels", "labels was not given"),
        ("gendd", "centres", "class centres"),
        ("gendd_unsup", "teacher_features", "teacher_features was not given"),
    ],
)
def test_missing_inputs_raise_one_clear_error(method: str, drop: str, message: str) -> None:
    backbone, classifier, head = _models(method)
    data = {**_teacher(), drop: None}
    with pytest.raises(GenddError, match=message):
        _objective(ObjectiveConfig(method=method), backbone, classifier, head, data)


def test_every_method_has_a_loss() -> None:
    assert all(method in method_module(method).LOSSES for method in METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_method_spec_says_what_the_loss_reads(method: str) -> None:
    """A loss refuses a missing input exactly when the method's MethodSpec says it reads it."""
    spec, cfg = METHOD_SPECS[method], ObjectiveConfig(method=method)
    backbone, classifier, head = _models(method)
    unread = {
        "labels": ({**_teacher(), "labels": None}, head, spec.supervised),
        "head": (_teacher(), None, spec.uses_head),
        "cache": ({**_teacher(), "teacher_features": None, "teacher_logits": None}, head, spec.uses_cache),
    }
    for what, (data, module, needed) in unread.items():
        if needed:
            with pytest.raises(GenddError, match="was not given"):
                _objective(cfg, backbone, classifier, module, data)
        else:
            loss, _ = _objective(cfg, backbone, classifier, module, data)
            assert torch.isfinite(loss), what


def test_gendd_without_a_head_raises() -> None:
    backbone, classifier, _ = _models("ce")
    with pytest.raises(GenddError, match="head was not given"):
        _objective(ObjectiveConfig(method="gendd"), backbone, classifier, None, _teacher())


def test_logit_adjustment_shifts_the_label_ce_by_the_log_prior() -> None:
    """ce, kd and the GenDD probe train on logits + tau * log(prior); tau = 0 is plain cross-entropy."""
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, -1])
    prior = class_log_prior(labels, 4)  # -1 (unlabelled) is not counted; an unseen class counts once
    assert torch.allclose(prior.exp(), torch.tensor([6.0, 2.0, 1.0, 1.0]) / 10)
    data, classifier = _teacher(), nn.Linear(D_S, C)
    feats, log_prior = torch.randn(B, D_S, generator=_gen(1)), class_log_prior(_teacher()["labels"], C)
    plain = F.cross_entropy(classifier(feats), data["labels"])
    shifted = F.cross_entropy(classifier(feats) + 2.0 * log_prior, data["labels"])
    common = {"feats": feats, "classifier": classifier, "head": None, "teacher_features": None, "centres": None}
    common |= {"teacher_logits": data["teacher_logits"], "labels": data["labels"], "log_prior": log_prior}
    loss, _ = compute_objective(ObjectiveConfig(method="ce", logit_adjust=2.0), **common)
    assert torch.allclose(loss, shifted) and not torch.allclose(loss, plain)
    loss, logs = compute_objective(ObjectiveConfig(method="kd", logit_adjust=2.0), **common)
    assert torch.allclose(logs["ce"], shifted)
    assert torch.allclose(compute_objective(ObjectiveConfig(method="ce"), **common)[0], plain)
    with pytest.raises(GenddError, match="class prior"):
        compute_objective(ObjectiveConfig(method="ce", logit_adjust=2.0), **{**common, "log_prior": None})
    with pytest.raises(GenddError, match="logit_adjust"):
        ObjectiveConfig(method="ce", logit_adjust=-1.0)
