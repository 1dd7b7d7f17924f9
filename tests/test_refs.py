"""Model references: every form the commands accept, and the errors for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenrun import catalog, errors
from qwenrun.hub.refs import parse_ref, reference_for, spec_for_repo

SPEC = catalog.CATALOG[0]
WITH_ALIAS = next(s for s in catalog.CATALOG if s.aliases)


def test_catalog_name():
    ref = parse_ref(SPEC.name)
    assert ref.kind == "catalog"
    assert ref.spec == SPEC
    assert ref.repos == tuple(SPEC.repos)
    assert ref.quant is None
    assert str(ref) == SPEC.name


def test_catalog_name_is_case_insensitive_and_the_quant_canonical():
    ref = parse_ref(f"{SPEC.name.upper()}:q4_k_m")
    assert ref.spec == SPEC
    assert ref.quant == "Q4_K_M"
    assert str(ref) == f"{SPEC.name}:Q4_K_M"


def test_alias_names_the_same_model():
    ref = parse_ref(f"{WITH_ALIAS.aliases[0]}:ud-q4_k_xl")
    assert ref.spec == WITH_ALIAS
    assert ref.quant == "UD-Q4_K_XL"


@pytest.mark.parametrize(
    "text",
    [
        "acme/Some-Model-GGUF:Q4_K_M",
        "acme/Some-Model-GGUF:q4_k_m",
        "hf.co/acme/Some-Model-GGUF:Q4_K_M",
        "huggingface.co/acme/Some-Model-GGUF:Q4_K_M",
        "https://huggingface.co/acme/Some-Model-GGUF:Q4_K_M",
        "HF.CO/acme/Some-Model-GGUF:Q4_K_M",
    ],
)
def test_hub_forms(text):
    ref = parse_ref(text)
    assert ref.kind == "hub"
    assert ref.repos == ("acme/Some-Model-GGUF",)
    assert ref.quant == "Q4_K_M"
    assert str(ref) == "acme/Some-Model-GGUF:Q4_K_M"


def test_hub_repo_without_quant():
    ref = parse_ref("hf.co/acme/Some-Model-GGUF")
    assert ref.kind == "hub" and ref.quant is None and ref.spec is None


def test_hub_repo_the_catalog_lists_carries_its_spec():
    repo = SPEC.repos[0]
    ref = parse_ref(f"hf.co/{repo.upper()}:Q8_0")
    assert ref.spec == SPEC
    assert spec_for_repo(repo.lower()) == SPEC
    assert reference_for(repo, "Q8_0") == f"{SPEC.name}:Q8_0"
    assert reference_for("acme/Other-GGUF", "Q8_0") == "acme/Other-GGUF:Q8_0"
    assert reference_for("acme/Other-GGUF", None) == "acme/Other-GGUF"


def test_existing_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    ref = parse_ref(str(tmp_path / "m.gguf"))
    assert ref.kind == "file" and ref.path == tmp_path / "m.gguf"
    monkeypatch.chdir(tmp_path)
    assert parse_ref("m.gguf").path == Path("m.gguf")
    assert parse_ref("./m.gguf").kind == "file"


def test_any_shard_of_a_split_model_names_its_first(tmp_path: Path):
    # llama.cpp loads a split model only from its first shard: run, chat and plan get that one.
    names = [f"m-Q8_0-0000{k}-of-00003.gguf" for k in (1, 2, 3)]
    for n in names:
        (tmp_path / n).write_bytes(b"GGUF")
    for n in names:
        ref = parse_ref(str(tmp_path / n))
        assert ref.kind == "file" and ref.path == tmp_path / names[0]
        assert ref.text == str(tmp_path / n)
    (tmp_path / names[0]).unlink()
    with pytest.raises(errors.ModelNotFoundError, match="missing 1 of 3 files"):
        parse_ref(str(tmp_path / names[1]))


@pytest.mark.parametrize("text", ["missing.gguf", "./models/nothere", "/no/such/model.GGUF"])
def test_missing_path_is_model_not_found(text, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.ModelNotFoundError, match="no such file"):
        parse_ref(text)


def test_folder_is_a_usage_error(tmp_path: Path):
    with pytest.raises(errors.UsageError, match="is a folder"):
        parse_ref(str(tmp_path))


def test_unknown_name_suggests_close_matches():
    typo = SPEC.name[:-1] + ("x" if SPEC.name[-1] != "x" else "y")
    with pytest.raises(errors.ModelNotFoundError) as info:
        parse_ref(f"{typo}:Q4_K_M")
    assert "did you mean" in info.value.message
    assert SPEC.name in info.value.message
    assert info.value.hint


def test_unrelated_name_has_no_suggestion():
    with pytest.raises(errors.ModelNotFoundError) as info:
        parse_ref("zzzz")
    assert "unknown model 'zzzz'" in info.value.message
    assert "did you mean" not in info.value.message


@pytest.mark.parametrize("text", ["", "   ", f"{SPEC.name}:", "acme/model:Q4 K", "a/b/c:Q4_K_M"])
def test_malformed_references_are_usage_errors(text):
    with pytest.raises(errors.UsageError):
        parse_ref(text)


def test_with_quant_normalises():
    assert parse_ref(SPEC.name).with_quant("q8_0").quant == "Q8_0"
