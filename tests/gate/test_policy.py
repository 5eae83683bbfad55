"""Policy files: loading, schema errors with their paths, the documented default."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import pytest
import tomllib

from maxact_card.errors import EXIT_USAGE, SchemaError, UsageError
from maxact_card.gate import policy as policy_module
from maxact_card.gate.policy import (
    COMPONENTS,
    DEFAULT_POLICY,
    FP16_MAX,
    QUANT_POLICIES,
    CardRules,
    Policy,
    QuantRules,
    load_policy,
    validate_policy,
)
from maxact_card.resources import load_schema
from tests import paths

POLICIES = paths.TESTS / "data" / "policies"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the schema ------------------------------------------------------------------------------------


def test_schema_is_draft_2020_12_and_versioned() -> None:
    schema = load_schema("maxact-policy.schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert re.search(r"/v1\.schema\.json$", schema["$id"])
    assert schema["properties"]["schema_version"] == {"const": 1}


def test_enums_match_the_results_schema_and_the_code() -> None:
    """Exhaustive: a component or quant policy added anywhere must be added everywhere."""
    policy_schema = load_schema("maxact-policy.schema.json")
    results_schema = load_schema("maxact-results.schema.json")
    assert tuple(policy_schema["$defs"]["component"]["enum"]) == COMPONENTS
    assert tuple(results_schema["$defs"]["component"]["enum"]) == COMPONENTS
    assert tuple(policy_schema["$defs"]["quant_policy"]["enum"]) == QUANT_POLICIES


# --- the default policy ---------------------------------------------------------------------------


def test_no_path_gives_the_default_policy() -> None:
    assert load_policy(None) is DEFAULT_POLICY


def test_default_policy_is_what_the_docs_say() -> None:
    assert DEFAULT_POLICY.fail_on_non_finite is True
    assert DEFAULT_POLICY.global_max_abs == FP16_MAX == 65504.0
    assert DEFAULT_POLICY.component_max_abs == ()
    assert DEFAULT_POLICY.quant == QuantRules(require_pass=("int8-dynamic-per-token",), if_missing="skip")
    assert DEFAULT_POLICY.max_peak_growth_pct == 25.0
    assert DEFAULT_POLICY.card == CardRules(require_section=False, fail_on_stale=True)


def test_default_policy_file_and_docstring_match_the_constant() -> None:
    """The TOML in the module docstring and tests/data/policies/default.toml are the default, exactly."""
    path = POLICIES / "default.toml"
    assert load_policy(path) == dataclasses.replace(DEFAULT_POLICY, source=str(path))
    doc = policy_module.__doc__ or ""
    block = doc.split("as a file it reads::", 1)[1].split("\nWhy these rules", 1)[0]
    text = "\n".join(line[4:] for line in block.splitlines())
    assert tomllib.loads(text) == tomllib.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("policy", [DEFAULT_POLICY, load_policy(POLICIES / "release.toml")])
def test_to_dict_is_schema_valid_and_round_trips(policy: Policy) -> None:
    doc = policy.to_dict()
    validate_policy(doc, "<to_dict>")
    assert Policy.from_dict(doc, source=policy.source) == policy


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_POLICY.global_max_abs = 1.0  # type: ignore[misc]


# --- loading files --------------------------------------------------------------------------------


def test_toml_and_json_policies_load() -> None:
    release = load_policy(POLICIES / "release.toml")
    assert release.name == "release"
    assert release.global_max_abs == 32752.0
    assert release.component_max_abs == (("attention", 1000.0), ("down_proj_input", 16384.0))  # model order
    assert release.quant == QuantRules(
        require_pass=("int8-dynamic-per-token",), min_sqnr_db=30.0, if_missing="fail"
    )
    assert release.max_peak_growth_pct == 10.0
    assert release.card == CardRules(require_section=True, fail_on_stale=True)
    permissive = load_policy(POLICIES / "permissive.json")
    assert permissive.global_max_abs == 1e6
    assert permissive.quant.is_empty()
    assert permissive.max_peak_growth_pct is None


def test_absent_keys_are_not_checked_and_booleans_default(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, "min.toml", "schema_version = 1\n"))
    assert policy.name == "min"
    assert policy.global_max_abs is None and policy.component_max_abs == ()
    assert policy.quant.is_empty() and policy.max_peak_growth_pct is None
    assert policy.fail_on_non_finite is True
    assert policy.card == CardRules(require_section=False, fail_on_stale=True)


def test_the_linear_input_components_take_limits_in_model_order(tmp_path: Path) -> None:
    text = ("schema_version = 1\n[limits.components]\nmlp_input = 3.0\ndown_proj_input = 4.0\n"
            "o_proj_input = 2.0\nattn_input = 1.0\n")
    policy = load_policy(_write(tmp_path, "gemm.toml", text))
    assert policy.component_max_abs == (("attn_input", 1.0), ("o_proj_input", 2.0), ("mlp_input", 3.0),
                                        ("down_proj_input", 4.0))


def test_quant_names_are_reported_in_a_fixed_order(tmp_path: Path) -> None:
    text = 'schema_version = 1\n[quant]\nrequire_pass = ["fp8-e4m3-static", "int8-static-maxabs"]\n'
    assert load_policy(_write(tmp_path, "q.toml", text)).quant.require_pass == (
        "int8-static-maxabs",
        "fp8-e4m3-static",
    )


def test_schema_errors_name_the_file_and_json_path() -> None:
    path = POLICIES / "invalid.toml"
    with pytest.raises(SchemaError) as info:
        load_policy(path)
    err = info.value
    assert err.exit_code == EXIT_USAGE
    assert err.message == (
        f"{path}::$.limits.global_max_abs: -5.0 is less than or equal to the minimum of 0"
        " (2 other errors; fix this one first)"
    )


def test_every_schema_error_is_found(tmp_path: Path) -> None:
    doc = tomllib.loads((POLICIES / "invalid.toml").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(load_schema("maxact-policy.schema.json"))
    paths = sorted(e.json_path for e in validator.iter_errors(doc))
    assert paths == ["$.limits.components", "$.limits.global_max_abs", "$.quant.require_pass[0]"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name = 'x'\n", "::$: 'schema_version' is a required property"),
        ("schema_version = 2\n", "::$.schema_version: 1 was expected"),
        (
            "schema_version = 1\n[limit]\nglobal_max_abs = 1.0\n",
            "::$: Additional properties are not allowed ('limit' was unexpected)",
        ),
        (
            "schema_version = 1\n[quant]\nif_missing = 'ignore'\n",
            "::$.quant.if_missing: 'ignore' is not one of ['fail', 'skip']",
        ),
        (
            "schema_version = 1\n[baseline]\nmax_peak_growth_pct = -1\n",
            "::$.baseline.max_peak_growth_pct: -1 is less than the minimum of 0",
        ),
        (
            "schema_version = 1\n[card]\nrequire_section = 'yes'\n",
            "::$.card.require_section: 'yes' is not of type 'boolean'",
        ),
        (
            "schema_version = 1\nfail_on_non_finite = 1\n",
            "::$.fail_on_non_finite: 1 is not of type 'boolean'",
        ),
    ],
)
def test_each_schema_error_is_reported_with_its_path(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, "p.toml", text)
    with pytest.raises(SchemaError) as info:
        load_policy(path)
    assert info.value.message == f"{path}{expected}"


def test_json_policy_schema_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.json", json.dumps({"schema_version": 1, "limits": {"components": {"mlp": 0}}}))
    with pytest.raises(
        SchemaError,
        match=re.escape(f"{path}::$.limits.components.mlp: 0 is less than or equal to the minimum of 0"),
    ):
        load_policy(path)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.toml", "schema_version = = 1\n", "not valid TOML"),
        (
            "bad.json",
            '{"schema_version": 1,}',
            "not valid JSON: Expecting property name enclosed in double quotes at line 1",
        ),
        ("policy.yaml", "schema_version: 1\n", "must end in .toml or .json"),
    ],
)
def test_unreadable_policies_are_usage_errors(tmp_path: Path, name: str, text: str, expected: str) -> None:
    with pytest.raises(UsageError, match=re.escape(expected)) as info:
        load_policy(_write(tmp_path, name, text))
    assert info.value.exit_code == EXIT_USAGE


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found") as info:
        load_policy(tmp_path / "nope.toml")
    assert "leave --policy out" in info.value.line()
