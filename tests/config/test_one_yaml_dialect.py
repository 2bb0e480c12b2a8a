"""One YAML dialect (YAML 1.2, router/yamltext.py) for every file splitserve reads: the
settings in the config file, the routing document and model.yaml. YAML 1.1 read
`access_log: off` as a boolean, and the documented value was refused (exit 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from router import parse_config_text, yamltext
from runtime.cli.main import CliError, _parse_config
from runtime.config.settings import Settings, settings_part
from runtime.repository.modelspec import SpecError, parse_spec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _blocks() -> list[tuple[str, str]]:
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, m in enumerate(re.finditer(r"```ya?ml\n(.*?)```", doc.read_text(), re.S)):
            out.append((f"{doc.name}#{i}", m.group(1)))
    for p in sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "model_repository").glob("*/model.yaml")):
        out.append((str(p.relative_to(ROOT)), p.read_text()))
    return out


@pytest.mark.parametrize("name,text", _blocks(), ids=[n for n, _ in _blocks()])
def test_every_example_reads_and_validates(name, text):
    doc = yamltext.load(text)
    if not isinstance(doc, dict):
        return
    if name.endswith("model.yaml") or {"inputs", "outputs", "max_batch_size"} & set(doc):
        parse_spec(text, name)
        return
    part = settings_part(doc)
    if part:
        Settings.model_validate(part)
    if "models" in doc:
        parse_config_text(text, name)


@pytest.mark.parametrize("value", ["off", "sample", "all"])
def test_access_log_values_are_strings_not_yaml_11_booleans(value):
    s = Settings.model_validate(settings_part(_parse_config(f"server: {{access_log: {value}}}\n", "c.yaml")))
    assert s.server.access_log == value


def test_yes_and_no_are_not_booleans_in_an_enum_field():
    with pytest.raises(Exception, match="access_log"):
        Settings.model_validate(settings_part(_parse_config("server: {access_log: yes}\n", "c.yaml")))


def test_invalid_yaml_is_one_line_with_where():
    with pytest.raises(CliError) as e:
        _parse_config("server:\n  host: [unclosed\n", "c.yaml")
    assert "\n" not in str(e.value) and "line 3" in str(e.value), str(e.value)
    with pytest.raises(SpecError, match=r"invalid YAML in m/model.yaml at line \d+"):
        parse_spec("inputs: [\n", "m/model.yaml")


def test_plain_values_come_out():
    doc = yamltext.load('a: "x"\nb: 1.5\nc: true\nd: [1, "2"]\n')
    assert doc == {"a": "x", "b": 1.5, "c": True, "d": [1, "2"]}
    assert type(doc["a"]) is str and type(doc["b"]) is float and type(doc["c"]) is bool
