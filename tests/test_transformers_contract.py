"""The parts of ``transformers.Trainer`` that MetaLRTrainer relies on, checked against the installed version.

MetaLRTrainer overrides, calls and reads members of the Trainer, several of them private (``_save``,
``_load_optimizer_and_scheduler``, ``_set_signature_columns_if_needed``, ``current_gradient_accumulation_steps``,
...), which a transformers release may rename or change without notice. They are listed, with the parameters
used, in ``hf_ddlr.trainer._TRAINER_MEMBERS_USED``; these tests fail with the member, the expected and the
installed signature and what to do, before a training run could fail in an obscure way. A second test keeps
the list complete: a new use of a Trainer member in trainer.py, or in a module of the package it is built from
(hf_ddlr.schedules, ...: they reach the Trainer as ``trainer`` / ``self.trainer``), without an entry fails too.
"""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path

import pytest
import transformers
from tiny import TinyMLP, make_split
from transformers import Trainer, TrainingArguments

import hf_ddlr.trainer as trainer_mod
from hf_ddlr import MetaLRTrainer

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"override", "call", "attribute"}


def _declared_range() -> str:
    m = re.search(r'"transformers([^"]*)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return m.group(1) if m else "(no transformers requirement found in pyproject.toml)"


def _advice(name: str) -> str:
    return (
        f"Installed: transformers {transformers.__version__}; hf_ddlr declares transformers{_declared_range()} "
        f"(pyproject.toml). Install a transformers version in that range, or adapt MetaLRTrainer's use of "
        f"Trainer.{name} (src/hf_ddlr/trainer.py) to the new Trainer, update its entry in _TRAINER_MEMBERS_USED "
        f"and the declared range, and rerun tests/test_trainer_*.py."
    )


def _trainer_classes() -> list[type]:
    return [c for c in Trainer.__mro__ if c.__module__.startswith("transformers")]


@functools.cache
def _trainer_source() -> str:
    return "\n".join(inspect.getsource(c) for c in _trainer_classes())


def _trainer_sets(name: str) -> bool:
    """A class attribute or method of the Trainer, or an attribute its code assigns (``self.name = ...``)."""
    if any(name in vars(c) for c in _trainer_classes()):
        return True
    return re.search(rf"self\.{re.escape(name)}\s*(?::[^=\n]+)?=(?!=)", _trainer_source()) is not None


def _param_names(fn) -> list[str]:
    """Parameter names without ``self``; ``*args`` / ``**kwargs`` as ``*name`` / ``**name``."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        out.append(prefix + p.name)
    return out


def test_the_table_is_well_formed():
    names = [name for name, _, _ in trainer_mod._TRAINER_MEMBERS_USED]
    assert len(names) == len(set(names)), "duplicate entries in _TRAINER_MEMBERS_USED"
    for name, how, params in trainer_mod._TRAINER_MEMBERS_USED:
        assert how in KINDS, f"{name}: unknown kind {how!r} (one of {sorted(KINDS)})"
        assert how != "attribute" or params == (), f"{name}: an attribute has no parameters"
        if how == "override":
            assert name in vars(MetaLRTrainer), f"{name} is listed as an override but MetaLRTrainer does not define it"


@pytest.mark.parametrize("name, how, params", trainer_mod._TRAINER_MEMBERS_USED,
                         ids=[e[0] for e in trainer_mod._TRAINER_MEMBERS_USED])
def test_trainer_member_is_as_metalrtrainer_uses_it(name, how, params):
    if how == "attribute":
        assert _trainer_sets(name), (
            f"transformers.Trainer no longer has or sets the attribute `{name}`, which MetaLRTrainer reads. "
            + _advice(name)
        )
        return
    member = getattr(Trainer, name, None)
    assert callable(member), (
        f"transformers.Trainer has no method `{name}`, which MetaLRTrainer {how}s with parameters "
        f"({', '.join(params)}). " + _advice(name)
    )
    got = _param_names(member)
    if how == "override":
        ok = tuple(got) == params
        rule = "exactly these parameters (the Trainer calls MetaLRTrainer's override with them)"
    else:
        ok = [p for p in got if p in params] == list(params)
        rule = "these parameters, in this order (MetaLRTrainer calls it with them)"
    assert ok, (
        f"transformers.Trainer.{name} changed: MetaLRTrainer expects {rule}: ({', '.join(params)}); installed: "
        f"{name}{inspect.signature(member)}. " + _advice(name)
    )


def test_accelerator_members_exist(tmp_path):
    t = Trainer(model=TinyMLP(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                train_dataset=make_split(8, seed=0))
    for name in trainer_mod._ACCELERATOR_MEMBERS_USED:
        assert hasattr(t.accelerator, name), (
            f"The Trainer's accelerate.Accelerator has no attribute `{name}`, which MetaLRTrainer reads "
            f"(fp16 loss scale / sharded set-ups). Installed: accelerate "
            f"{__import__('accelerate').__version__}. Adapt src/hf_ddlr/trainer.py and _ACCELERATOR_MEMBERS_USED."
        )


def _implementation_sources() -> dict[str, str]:
    """trainer.py and the modules of the package it imports, directly or through one another (relative
    imports ``from .x import``; hf_ddlr.meta is a package of pure torch and never sees the Trainer)."""
    package = Path(trainer_mod.__file__).parent
    todo, sources = [Path(trainer_mod.__file__)], {}
    while todo:
        path = todo.pop()
        if path.name in sources:
            continue
        sources[path.name] = path.read_text(encoding="utf-8")
        for name in re.findall(r"^\s*from \.(\w+) import", sources[path.name], re.M):
            if (package / f"{name}.py").is_file():
                todo.append(package / f"{name}.py")
    return sources


def _members_used_in(source: str, is_trainer_module: bool) -> set[str]:
    """The Trainer members ``source`` touches: through ``trainer`` / ``self.trainer`` (trainer.x,
    getattr(trainer, "x")) and, in trainer.py, as MetaLRTrainer itself (super().x, self.x, getattr(self, "x")):
    the names used there that the Trainer defines or sets, whether MetaLRTrainer overrides them or not."""
    used = set(re.findall(r"(?<![\w.])(?:self\.)?trainer\.(\w+)", source))
    used |= set(re.findall(r"getattr\((?:self\.)?trainer,\s*\"(\w+)\"", source))
    if is_trainer_module:
        used |= set(re.findall(r"super\(\)\.(\w+)", source))
        used |= set(re.findall(r"(?<![\w.])self\.(\w+)", source))
        used |= set(re.findall(r"getattr\(self,\s*\"(\w+)\"", source))
    return {n for n in used if _trainer_sets(n)}


def _members_used_in_trainer_module() -> dict[str, set[str]]:
    """For trainer.py and every module it is built from: the Trainer members it uses."""
    return {name: _members_used_in(src, name == "trainer.py") for name, src in _implementation_sources().items()}


def test_the_scan_covers_the_modules_trainer_is_built_from():
    """The modules the schedules and checkpoints live in are scanned, and a use through ``self.trainer`` or
    ``getattr(trainer, ...)`` there counts (negative control for the completeness test below)."""
    assert {"trainer.py", "schedules.py", "_batches.py", "_checkpoint.py"} <= set(_implementation_sources())
    assert _members_used_in("x = self.trainer.is_world_process_zero()", False) == {"is_world_process_zero"}
    assert _members_used_in('getattr(trainer, "_train_batch_size", None)', False) == {"_train_batch_size"}
    assert _members_used_in("self.optimizer", False) == set()  # another object's own attribute
    assert _members_used_in("self.optimizer", True) == {"optimizer"}


def test_every_trainer_member_used_is_in_the_table():
    listed = {name for name, _, _ in trainer_mod._TRAINER_MEMBERS_USED}
    unlisted = {name: sorted(used - listed) for name, used in _members_used_in_trainer_module().items()}
    unlisted = {name: members for name, members in unlisted.items() if members}
    assert not unlisted, (
        f"src/hf_ddlr uses Trainer members that _TRAINER_MEMBERS_USED does not list: {unlisted}. "
        "Add an entry (member, 'override' | 'call' | 'attribute', parameter names) so that this contract test "
        "checks them against every transformers version."
    )


def test_the_check_fails_on_a_changed_signature(monkeypatch):
    """Negative control: a Trainer whose _save took another parameter, or lost a member, is reported."""
    def changed_save(self, output_dir=None, state_dict=None, safe_serialization=True):
        pass

    monkeypatch.setattr(Trainer, "_save", changed_save)
    with pytest.raises(AssertionError, match=r"Trainer\._save changed: .*\(output_dir, state_dict\).*installed"):
        test_trainer_member_is_as_metalrtrainer_uses_it("_save", "override", ("output_dir", "state_dict"))
    monkeypatch.delattr(Trainer, "_load_best_model")
    with pytest.raises(AssertionError, match=r"has no method `_load_best_model`.*transformers 5\.\d+"):
        test_trainer_member_is_as_metalrtrainer_uses_it("_load_best_model", "override", ())
    with pytest.raises(AssertionError, match="no longer has or sets the attribute `_no_such_member`"):
        test_trainer_member_is_as_metalrtrainer_uses_it("_no_such_member", "attribute", ())
