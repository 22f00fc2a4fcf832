"""Layer-wise distance constraint: projections, radii by depth, head, adapters (LoRA, duck-typed, RLRR), penalty."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_vit
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_tsrs.regularizers import DistanceConstraint, project_frobenius_, project_inf_op_

TOL = 1 + 1e-5


# --- the projections by hand ----------------------------------------------------------------------------
def test_project_frobenius_by_hand():
    delta = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ‖Δ‖_F = 5
    factor = project_frobenius_(delta, 2.5)  # 1 / max(1, 5 / 2.5) = 0.5
    assert factor == pytest.approx(0.5)
    torch.testing.assert_close(delta, torch.tensor([[1.5, 2.0], [0.0, 0.0]]))
    inside = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert project_frobenius_(inside, 10.0) == 1.0  # 1 / max(1, 5 / 10) = 1
    assert torch.equal(inside, torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    zero_radius = torch.tensor([[1.0, 1.0]])
    assert project_frobenius_(zero_radius, 0.0) == 0.0 and torch.equal(zero_radius, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="radius"):
        project_frobenius_(inside, -1.0)


def test_project_inf_op_by_hand():
    delta = torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.5, 0.0]])  # row L1 norms: 4 and 1
    factors = project_inf_op_(delta, 2.0)  # row 0: 1 / max(1, 4/2) = 0.5 ; row 1: 1 / max(1, 1/2) = 1
    torch.testing.assert_close(factors, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(delta, torch.tensor([[0.5, -0.5, 1.0], [0.5, 0.5, 0.0]]))
    # > 2-D: all dims but the first are flattened; row 0 has L1 = 1+2+3+4 = 10, row 1 has L1 = 0.4
    conv = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.1, 0.1], [0.1, 0.1]]])
    factors = project_inf_op_(conv, 5.0)
    torch.testing.assert_close(factors, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(conv[0], torch.tensor([[0.5, 1.0], [1.5, 2.0]]))
    torch.testing.assert_close(conv[1], torch.full((2, 2), 0.1))


# --- construction and radii ------------------------------------------------------------------------------
def test_exactly_one_of_radius_and_ratio():
    model = make_tiny_bert()
    with pytest.raises(ValueError, match="exactly one of radius"):
        DistanceConstraint(model, radius=1.0, ratio=0.1)
    with pytest.raises(ValueError, match="needs a radius"):
        DistanceConstraint(model)
    with pytest.raises(ValueError, match="norm must be"):
        DistanceConstraint(model, norm="l2", radius=1.0)  # type: ignore[arg-type]
    DistanceConstraint(model, mode="penalty")  # penalty mode does not need a radius


def test_radii_grow_with_depth_on_4_block_bert():
    model = make_tiny_bert(layers=4)
    dc = DistanceConstraint(model, radius=0.5, depth_scale=2.0, head_radius=0.3)
    radii = dc.radii()
    assert radii["bert.embeddings.word_embeddings.weight"] == 0.5  # before the blocks: D
    for i, expected in enumerate([0.5, 0.5, 1.0, 2.0]):  # stages D, D, D·s, D·s²
        assert radii[f"bert.encoder.layer.{i}.attention.self.query.weight"] == expected
        assert radii[f"bert.encoder.layer.{i}.output.dense.weight"] == expected
    assert radii["bert.pooler.dense.weight"] == 2.0  # after the blocks, not the head: D·s²
    assert radii["classifier.weight"] == 0.3  # the head has its own radius
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in radii)  # vectors are skipped


def test_radii_two_blocks_and_frozen_skipped():
    model = make_tiny_vit(layers=2)
    model.vit.embeddings.requires_grad_(False)
    dc = DistanceConstraint(model, radius=1.0, depth_scale=3.0)
    radii = dc.radii()
    assert radii["vit.layers.0.mlp.fc1.weight"] == 1.0  # stage floor(4·0/2) = 0
    assert radii["vit.layers.1.mlp.fc1.weight"] == 3.0  # stage floor(4·1/2) = 2 -> D·s
    assert not any("embeddings" in n for n in radii)  # frozen parameters are not constrained
    assert "classifier.weight" not in radii  # head_radius=None: unconstrained


def test_ratio_mode_radii():
    model = make_tiny_bert()
    q = model.bert.encoder.layer[1].attention.self.query.weight.detach()
    frob = DistanceConstraint(model, ratio=0.1).radii()
    assert frob["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(0.1 * float(q.norm()))
    inf = DistanceConstraint(model, norm="inf-op", ratio=0.1).radii()
    assert inf["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(
        0.1 * float(q.abs().sum(1).max())
    )


def test_only_linear_and_conv_weights_are_constrained():
    """Official: 2-D (linear) and 4-D (conv) weights only; ViT position embeddings and the CLS token stay free."""
    model = make_tiny_vit(layers=2)
    for mode in ("project", "penalty"):
        radii = DistanceConstraint(model, radius=1.0, head_radius=1.0, mode=mode).radii()
        assert "vit.embeddings.patch_embeddings.projection.weight" in radii  # 4-D conv
        assert "vit.layers.0.attention.q_proj.weight" in radii and "classifier.weight" in radii  # 2-D
        assert "vit.embeddings.position_embeddings" not in radii  # (1, N, D)
        assert "vit.embeddings.cls_token" not in radii  # (1, 1, D)
    dc = DistanceConstraint(model, radius=1e-3)
    cls, pos = model.vit.embeddings.cls_token, model.vit.embeddings.position_embeddings
    with torch.no_grad():
        cls.add_(1.0)
        pos.add_(1.0)
    cls_before, pos_before = cls.detach().clone(), pos.detach().clone()
    dc.project()
    assert torch.equal(cls, cls_before) and torch.equal(pos, pos_before)  # never pulled back


def test_inf_op_ratio_radius_is_per_row():
    """Official ratio mode with inf-op: row i of Δ is bounded by ratio·‖W0_i‖₁, not by ratio·max_i ‖W0_i‖₁."""
    model = _Tiny()
    w0 = torch.tensor([[1.0, 1.0], [4.0, -4.0]])  # row L1 norms 2 and 8
    with torch.no_grad():
        model.layers[0].weight.copy_(w0)
    dc = DistanceConstraint(model, norm="inf-op", ratio=0.5)
    torch.testing.assert_close(dc.row_radii()["layers.0.weight"], torch.tensor([1.0, 4.0]))
    assert dc.radii()["layers.0.weight"] == pytest.approx(4.0)  # the largest row radius
    with torch.no_grad():
        model.layers[0].weight.add_(torch.tensor([[2.0, 1.0], [1.0, 1.0]]))  # row L1 of Δ: 3 and 2
    assert dc.max_violation() == pytest.approx(2.0)  # row 0: 3 − 1
    dc.project()
    # row 0: 3 > 1 -> Δ·1/3 ; row 1: 2 <= 4 -> unchanged (a single radius 4 would leave row 0 alone too)
    torch.testing.assert_close(model.layers[0].weight.detach() - w0, torch.tensor([[2 / 3, 1 / 3], [1.0, 1.0]]))
    assert dc.max_violation() <= 1e-6
    # resumed: the per-row radii come from the restored anchors
    resumed = DistanceConstraint(model, norm="inf-op", ratio=0.5)
    resumed.load_state_dict(dc.state_dict())
    torch.testing.assert_close(resumed.row_radii()["layers.0.weight"], torch.tensor([1.0, 4.0]))


def test_inf_op_ratio_radius_per_row_for_adapters():
    model = _DuckModel()
    with torch.no_grad():
        model.layers[0].base_layer.weight.copy_(torch.tensor([[1.0, 1.0], [3.0, 3.0]]))  # row L1: 2 and 6
    dc = DistanceConstraint(model, norm="inf-op", ratio=0.5)  # D_row = 1 and 3
    dc.project()  # ΔW = [[3, 4], [0, 1]]: row L1 7 > 1 -> factor 1/7 ; 1 <= 3 -> 1
    torch.testing.assert_close(model.layers[0].scale["a"].detach(), torch.tensor([1.0 / 7.0, 1.0]))


# --- projection on a model -----------------------------------------------------------------------------
def _perturb(model: nn.Module, scale: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("norm", ["frob", "inf-op"])
def test_projection_keeps_within_radius(norm):
    model = make_tiny_bert(layers=4)
    dc = DistanceConstraint(model, norm=norm, radius=0.2, depth_scale=1.5, head_radius=0.4)
    anchors = {it.name: it.anchor.clone() for it in dc.items if it.anchor is not None}
    _perturb(model, 0.5)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in dc.radii()}
    assert dc.max_violation() > 0
    assert dc.project() == len(dc.items)
    dist, radii = dc.distances(), dc.radii()
    for name in radii:
        assert dist[name] <= radii[name] * TOL
        p = params[name].detach()
        anchor = anchors.get(name, torch.zeros_like(p))
        old, new = before[name] - anchor, p - anchor
        if norm == "frob":  # one factor for the whole matrix, same direction
            assert dist[name] == pytest.approx(radii[name], rel=1e-5)
            f = float(new.norm() / old.norm())
            torch.testing.assert_close(new, old * f, atol=1e-6, rtol=1e-5)
        else:  # every row within the radius, each row only rescaled
            rows = new.reshape(new.shape[0], -1).abs().sum(1)
            assert bool((rows <= radii[name] * TOL).all())
            ratio = new.reshape(new.shape[0], -1).norm(dim=1) / old.reshape(old.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(new, old * ratio.reshape(-1, *([1] * (old.ndim - 1))), atol=1e-6, rtol=1e-5)
    assert dc.max_violation() <= 1e-5
    assert dc.project() == 0  # idempotent


def test_within_radius_weights_untouched():
    model = make_tiny_bert()
    dc = DistanceConstraint(model, radius=1.0, head_radius=10.0)
    q = model.bert.encoder.layer[0].attention.self.query.weight
    v = model.bert.encoder.layer[0].attention.self.value.weight
    with torch.no_grad():
        q.add_(0.001)  # ‖Δ‖_F = 0.001·16 = 0.016 < 1
        v.add_(1.0)  # ‖Δ‖_F = 16 > 1
    q_before = q.detach().clone()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p is not v}
    assert dc.project() == 1
    assert torch.equal(q, q_before)
    for n, p in model.named_parameters():
        if p is not v:
            assert torch.equal(p, snapshot[n]), n
    assert dc.distances()["bert.encoder.layer.0.attention.self.value.weight"] == pytest.approx(1.0, rel=1e-5)


def test_head_constrained_around_zero():
    model = make_tiny_bert()
    dc = DistanceConstraint(model, radius=100.0, head_radius=0.05)
    w = model.classifier.weight
    old = w.detach().clone()
    assert float(old.norm()) > 0.05
    dc.project()
    assert float(w.detach().norm()) == pytest.approx(0.05, rel=1e-5)  # projected towards 0, not towards W0
    torch.testing.assert_close(w.detach(), old * (0.05 / float(old.norm())))


def test_head_inside_modules_to_save_wrapper():
    model = get_peft_model(make_tiny_bert(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
    dc = DistanceConstraint(model, radius=1.0, head_radius=0.05)
    name = "base_model.model.classifier.modules_to_save.default.weight"
    assert dc.radii()[name] == 0.05
    assert not any("original_module" in n for n in dc.radii())  # frozen copy skipped
    dc.project()
    assert dc.distances()[name] <= 0.05 * TOL


# --- adapters --------------------------------------------------------------------------------------------
def _lora_bert(layers: int = 4):
    cfg = LoraConfig(target_modules=["query", "value"], r=2, init_lora_weights=False, modules_to_save=["classifier"])
    return get_peft_model(make_tiny_bert(layers=layers), cfg)


@pytest.mark.parametrize("norm", ["frob", "inf-op"])
def test_lora_projection_bounds_delta_weight(norm):
    model = _lora_bert()
    dc = DistanceConstraint(model, norm=norm, radius=0.05, depth_scale=2.0)
    radii = dc.radii()
    assert not any("lora_A" in n or "lora_B" in n for n in radii)  # raw LoRA params not constrained again
    lora_layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(lora_layers) == 8
    for n in lora_layers:
        assert f"{n}.delta_weight.default" in radii
    assert radii["base_model.model.bert.encoder.layer.3.attention.self.query.delta_weight.default"] == 0.2
    before = {n: m.get_delta_weight("default").detach().clone() for n, m in lora_layers.items()}
    assert dc.max_violation() > 0  # init_lora_weights=False: ΔW ≠ 0
    dc.project()
    for n, m in lora_layers.items():
        delta = m.get_delta_weight("default").detach()  # PEFT's own ΔW
        r = radii[f"{n}.delta_weight.default"]
        if norm == "frob":
            assert float(delta.norm()) <= r * TOL
            f = float(delta.norm() / before[n].norm())
            torch.testing.assert_close(delta, before[n] * f, atol=1e-7, rtol=1e-5)
        else:
            assert bool((delta.abs().sum(1) <= r * TOL).all())
    assert dc.max_violation() <= 1e-6


def test_lora_penalty_is_sum_of_squared_delta_weights():
    model = _lora_bert(layers=2)
    dc = DistanceConstraint(model, mode="penalty", penalty_weight=0.5)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    expected = 0.5 * sum(float(m.get_delta_weight("default").detach().pow(2).sum()) for m in lora_layers)
    pen = dc.loss()
    assert pen.item() == pytest.approx(expected, rel=1e-5)
    pen.backward()
    assert lora_layers[0].lora_B["default"].weight.grad is not None
    assert dc.after_step() == 0  # penalty mode never projects


class _DuckAdapter(nn.Module):
    """ΔW = diag(scale) @ M: rows scale with ``scale`` (the interface RLRR/PACE layers expose)."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(2, 2)
        self.base_layer.requires_grad_(False)
        self.scale = nn.ParameterDict({"a": nn.Parameter(torch.tensor([1.0, 1.0]))})
        self.mat = nn.ParameterDict({"a": nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))})
        self.active_adapters = ["a"]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.scale[adapter_name][:, None] * self.mat[adapter_name]

    def scale_delta_weight_rows_(self, adapter_name: str, factors: torch.Tensor) -> None:
        self.scale[adapter_name].data.mul_(factors)


class _DuckModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_DuckAdapter(), _DuckAdapter()])


def test_duck_typed_adapter_inf_op_by_hand():
    model = _DuckModel()
    dc = DistanceConstraint(model, norm="inf-op", radius=2.0)
    assert sorted(dc.radii()) == ["layers.0.delta_weight.a", "layers.1.delta_weight.a"]  # raw params excluded
    # ΔW = [[3, 4], [0, 1]]: row L1 norms 7 and 1 -> factors 2/7 and 1
    assert dc.distances()["layers.0.delta_weight.a"] == pytest.approx(7.0)
    dc.project()
    torch.testing.assert_close(model.layers[0].scale["a"].detach(), torch.tensor([2.0 / 7.0, 1.0]))
    assert dc.distances()["layers.0.delta_weight.a"] == pytest.approx(2.0)


def test_duck_typed_adapter_frobenius_and_ratio():
    model = _DuckModel()
    with torch.no_grad():
        model.layers[0].base_layer.weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))  # ‖W_base‖_F = 5
    dc = DistanceConstraint(model, ratio=0.5)  # D = 0.5·5 = 2.5
    assert dc.radii()["layers.0.delta_weight.a"] == pytest.approx(2.5)
    # ‖ΔW‖_F = sqrt(9 + 16 + 0 + 1) = sqrt(26) -> one factor 2.5 / sqrt(26) for every row
    dc.project()
    f = 2.5 / math.sqrt(26.0)
    torch.testing.assert_close(model.layers[0].scale["a"].detach(), torch.tensor([f, f]))


def test_rlrr_layers_are_constrained_through_their_delta_weight():
    import peft_tsrs

    model = get_peft_model(make_tiny_bert(layers=4), peft_tsrs.RLRRConfig(init_weights="random"))
    dc = DistanceConstraint(model, radius=0.01, depth_scale=2.0)
    assert dc.radii() and all(".delta_weight." in n for n in dc.radii())
    assert not any("rlrr_" in n for n in dc.radii())
    dc.project()
    assert dc.max_violation() <= 1e-6


# --- penalty ---------------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.classifier = nn.Linear(2, 2)


def test_penalty_by_hand():
    model = _Tiny()
    dc = DistanceConstraint(model, radius=1.0, head_radius=1.0, mode="penalty", penalty_weight=0.1)
    with torch.no_grad():
        model.layers[0].weight.add_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # ‖Δ‖² = 1 + 4 = 5
        model.layers[1].weight.add_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # ‖Δ‖² = 2
        model.classifier.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))  # head around 0: ‖W‖² = 6
    pen = dc.penalty()
    assert pen.item() == pytest.approx(0.1 * (5 + 2 + 6))  # = 1.3
    assert dc.loss().item() == pytest.approx(1.3)
    pen.backward()
    torch.testing.assert_close(model.layers[0].weight.grad, 0.2 * torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(model.classifier.weight.grad, 0.2 * torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    assert model.layers[0].bias.grad is None  # biases are not penalised


def test_penalty_uses_the_configured_norm_stage_scale_and_head_weight():
    """Official penalty: the configured norm (inf-op: max-row L1, not squared), λ·γ^stage (λ, λ, λγ, λγ²) over the
    four stages and its own λ for the head, around zero."""
    model = make_tiny_bert(layers=4)
    dc = DistanceConstraint(model, norm="inf-op", mode="penalty", penalty_weight=0.1, penalty_stage_scale=2.0,
                            head_penalty_weight=0.7)
    _perturb(model, 0.1)
    params = dict(model.named_parameters())
    anchors = {it.name: it.anchor for it in dc.items if it.anchor is not None}
    expected = 0.0
    for name in dc.radii():
        p = params[name].detach()
        delta = p - anchors[name] if name in anchors else p
        dist = float(delta.reshape(delta.shape[0], -1).abs().sum(1).max())
        if name == "classifier.weight":
            weight = 0.7  # the head's own λ, although no head radius is set
        elif ".layer." in name:
            weight = 0.1 * (1.0, 1.0, 2.0, 4.0)[int(name.split(".layer.")[1].split(".")[0])]
        else:
            weight = 0.1 * (4.0 if "pooler" in name else 1.0)  # after the blocks: last stage; before: first
        expected += weight * dist
    assert "classifier.weight" in dc.radii()
    assert dc.penalty().item() == pytest.approx(expected, rel=1e-5)
    # frob: squared Frobenius with the same stage weights
    frob = DistanceConstraint(_Tiny(), mode="penalty", penalty_weight=0.1, head_penalty_weight=0.0)
    assert "classifier.weight" in frob.radii() and frob.penalty().item() == 0.0  # head λ = 0 -> no head term


def test_inf_op_penalty_is_the_max_row_l1_norm():
    model = _Tiny()
    dc = DistanceConstraint(model, norm="inf-op", mode="penalty", penalty_weight=0.1)
    with torch.no_grad():
        model.layers[0].weight.add_(torch.tensor([[1.0, -2.0], [0.0, 0.5]]))  # row L1 norms 3 and 0.5 -> 3
        model.layers[1].weight.add_(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))  # 1 and 2 -> 2
    pen = dc.penalty()
    assert pen.item() == pytest.approx(0.1 * (3 + 2))  # not 0.1·(5.25 + 3), the squared Frobenius norms
    pen.backward()  # the gradient of max-row L1 is λ·sign(Δ) on the largest row
    torch.testing.assert_close(model.layers[0].weight.grad, 0.1 * torch.tensor([[1.0, -1.0], [0.0, 0.0]]))


def test_penalty_without_head_weight_keeps_the_single_lambda():
    model = _Tiny()
    assert "classifier.weight" not in DistanceConstraint(model, mode="penalty").radii()  # no head radius, no λ
    dc = DistanceConstraint(model, head_radius=1.0, mode="penalty", penalty_weight=0.1)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    assert dc.penalty().item() == pytest.approx(0.1 * 6)
    with pytest.raises(ValueError, match="penalty_stage_scale"):
        DistanceConstraint(model, mode="penalty", penalty_stage_scale=0.0)


def test_project_mode_loss_is_zero_and_after_step_projects():
    model = _Tiny()
    dc = DistanceConstraint(model, radius=0.1)
    _perturb(model, 1.0)
    assert dc.loss().item() == 0.0
    assert dc.after_step() == 2
    assert dc.max_violation() <= 1e-6


def test_anchor_state_round_trip():
    model = make_tiny_bert()
    dc = DistanceConstraint(model, radius=0.1)
    state = dc.state_dict()
    _perturb(model, 0.5)
    resumed = DistanceConstraint(model, radius=0.1)  # anchors at the perturbed weights...
    assert resumed.max_violation() == 0.0
    resumed.load_state_dict(state)  # ...until the original anchors are restored
    assert resumed.max_violation() > 0
    resumed.project()
    for name, w0 in state["anchors"].items():
        assert float((dict(model.named_parameters())[name].detach() - w0).norm()) <= 0.1 * TOL
    with pytest.raises(ValueError, match="does not match"):
        DistanceConstraint(make_tiny_bert(layers=3), radius=0.1).load_state_dict(state)


def test_penalty_options_reach_the_constraint_from_the_config():
    from peft_tsrs import RegularizerConfig
    from peft_tsrs.regularizers import BuildContext, DistanceRegularizer

    cfg = RegularizerConfig(distance_norm="inf-op", distance_mode="penalty", distance_penalty_weight=0.1,
                            distance_penalty_stage_scale=3.0, distance_head_penalty_weight=0.5)
    reg = DistanceRegularizer.create(BuildContext(config=cfg, model=make_tiny_bert(layers=4), index_and_labels=None,
                                                  num_labels=None))
    weights = {it.name: it.penalty_weight for it in reg.constraint.items}
    assert weights["bert.encoder.layer.3.output.dense.weight"] == pytest.approx(0.1 * 9.0)
    assert weights["bert.encoder.layer.2.output.dense.weight"] == pytest.approx(0.1 * 3.0)
    assert weights["bert.encoder.layer.0.output.dense.weight"] == pytest.approx(0.1)
    assert weights["classifier.weight"] == pytest.approx(0.5)
    for bad, match in (({"distance_penalty_stage_scale": 0.0}, "distance_penalty_stage_scale must be > 0"),
                       ({"distance_head_penalty_weight": -1.0}, "distance_head_penalty_weight must be >= 0")):
        with pytest.raises(ValueError, match=match):
            RegularizerConfig(**bad)
