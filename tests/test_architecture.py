"""The shape of the package: one regularizer protocol the trainer loops over, the library apart from the app, no
import cycles, deprecated names that keep working."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_bert
from test_trainer import batch_of, make_args, make_dataset, no_dropout_bert

import peft_tsrs
from peft_tsrs import RegularizedTrainer, RegularizerConfig
from peft_tsrs.regularizers import base as regularizer_base
from peft_tsrs.regularizers.base import BuildContext, Regularizer, StepContext

PACKAGE = Path(peft_tsrs.__file__).parent


# --------------------------------------------------------------------------------------------- one protocol
class CountingL2(Regularizer):
    """A fifth regularizer, defined here: ``weight · mean(logits²)``, counting its after-step calls."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.steps = 0

    @classmethod
    def create(cls, build: BuildContext) -> "CountingL2":
        return cls(0.25)

    def loss(self, step: StepContext) -> dict[str, torch.Tensor]:
        return {"loss_toy": self.weight * step.logits.float().pow(2).mean()}

    def after_step(self) -> None:
        self.steps += 1

    def logs(self) -> dict[str, float]:
        return {"toy_steps": self.steps}


@pytest.fixture
def toy_registered():
    before = regularizer_base.registered_regularizers()
    regularizer_base.register_regularizer("toy", CountingL2)  # the one registry line
    try:
        yield
    finally:
        regularizer_base._REGISTRY.clear()
        regularizer_base._REGISTRY.update(before)


def test_a_fifth_regularizer_is_one_class_and_one_registry_line(tmp_path, toy_registered):
    ds = make_dataset()
    trainer = RegularizedTrainer(model=no_dropout_bert(), args=make_args(tmp_path, max_steps=2), train_dataset=ds)
    toy = trainer.regularizers["toy"]
    batch = batch_of(ds)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"]) + 0.25 * logits.pow(2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    trainer.train()
    assert toy.steps == 2  # after_step ran after each optimizer step
    logged = [h for h in trainer.state.log_history if "loss_toy" in h]
    assert logged and all(h["toy_steps"] >= 1 for h in logged)


GENERIC = {"index_column", "needs_index", "is_noop"}  # config facts that concern no single method


def test_trainer_has_no_per_method_dispatch():
    source = (PACKAGE / "trainer" / "trainer.py").read_text()
    tree = ast.parse(source)
    config_attrs = {f for f in RegularizerConfig.field_names()} | {
        n for n, v in vars(RegularizerConfig).items() if isinstance(v, property)}
    offending = [node.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr in config_attrs and node.attr not in GENERIC]
    assert offending == [], f"the trainer reads method-specific config fields: {offending}"
    for name in ("NoiseStability", "DistanceConstraint", "LabelCorrector", "FastConsistencyStore", "shared_dropout"):
        assert name not in source


def test_registry_builds_only_what_the_config_switches_on(tmp_path):
    ds = make_dataset()
    off = RegularizedTrainer(model=make_tiny_bert(), args=make_args(tmp_path), train_dataset=ds)
    assert off.regularizers == {}
    cfg = RegularizerConfig(tsrs_weight=0.1, pace_weight=0.1, pace_mode="fast", pace_sigma=0.0, distance_norm="frob",
                            distance_radius=1.0, label_correction_threshold=0.9)
    on = RegularizedTrainer(model=make_tiny_bert(), args=make_args(tmp_path), train_dataset=ds, regularizers=cfg)
    assert list(on.regularizers) == ["tsrs", "pace", "distance", "self_labeling"]
    assert on.needs_index


def test_register_regularizer_refuses_non_regularizers():
    with pytest.raises(TypeError, match="Regularizer subclass"):
        regularizer_base.register_regularizer("bad", object)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- import graph
def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``peft_tsrs`` module imported anywhere in a file (function-level imports included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("peft_tsrs")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("peft_tsrs"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {t for t in _imports(path) if t in files and t != name}
    return graph


def test_library_never_imports_the_app():
    graph = _graph()
    leaks = {m: sorted(t for t in targets if t.startswith("peft_tsrs.app"))
             for m, targets in graph.items() if not m.startswith("peft_tsrs.app")}
    assert {m: t for m, t in leaks.items() if t} == {}


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages work; a submodule importing back up its
    # package's __init__ is only a cycle when that __init__ is on the path back
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own children
                continue
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    cycles = [c for c in cycles if not any(b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert cycles == []


# --------------------------------------------------------------------------------------------- names
def test_deprecated_names_still_work_with_a_warning():
    for old, new in (("TSRSConfig", "RegularizerConfig"), ("TSRSTrainer", "RegularizedTrainer"),
                     ("TSRSTrainingArguments", "RegularizedTrainingArguments")):
        with pytest.warns(FutureWarning, match=f"{old} is renamed {new}"):
            assert getattr(peft_tsrs, old) is getattr(peft_tsrs, new)
    with pytest.raises(AttributeError):
        peft_tsrs.NoSuchName  # noqa: B018


def test_old_block_path_key_is_read():
    with pytest.warns(FutureWarning, match="'tsrs_block_path' is renamed 'block_path'"):
        cfg = RegularizerConfig.from_dict({"tsrs_weight": 1.0, "tsrs_block_path": "bert.encoder.layer"})
    assert cfg.block_path == "bert.encoder.layer"


def test_penalty_mode_needs_no_radius():
    assert RegularizerConfig(distance_norm="frob", distance_mode="penalty").uses_distance
    with pytest.raises(ValueError, match="exactly one of distance_radius"):
        RegularizerConfig(distance_norm="frob")
    with pytest.raises(ValueError, match="exactly one of distance_radius"):
        RegularizerConfig(distance_norm="frob", distance_mode="penalty", distance_radius=1.0, distance_ratio=0.1)


def test_old_trainer_keyword_still_works(tmp_path):
    cfg = RegularizerConfig(tsrs_weight=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = RegularizedTrainer(model=make_tiny_bert(), args=make_args(tmp_path), train_dataset=make_dataset(),
                                     tsrs=cfg)
    assert trainer.regularizer_config is cfg and trainer.tsrs is cfg and list(trainer.regularizers) == ["tsrs"]
