"""The one key=value parser behind both log formats, and the one-line guarantee."""

import json
import logging
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.logs import JsonFormatter, KvFormatter, kv, one_line, parse, set_level, setup_logging

pytestmark = pytest.mark.unit  # starts no server process, binds no socket


def record(msg, *args, exc_info=None, name="splitserve.test", level=logging.INFO):
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize("msg, pairs, words", [
    ("event=x", {"event": "x"}, ""),
    ("event=x reason='load did not finish'", {"event": "x", "reason": "load did not finish"}, ""),
    ("reason=\"it's here\" n=3", {"reason": "it's here", "n": 3}, ""),
    ("e='a \\'quoted\\' word' f=1.5 g=-2 h=1e3", {"e": "a 'quoted' word", "f": 1.5, "g": -2, "h": 1000.0}, ""),
    ("cfg={'labels': {'stable': 1}, 'w': [1, 2]} next=1",
     {"cfg": {"labels": {"stable": 1}, "w": [1, 2]}, "next": 1}, ""),
    ("v=None ok=True no=False", {"v": None, "ok": True, "no": False}, ""),
    ("some words event=x more", {"event": "x"}, "some words more"),
    ("empty= next=1", {"empty": "", "next": 1}, ""),
    ("bad='unterminated and the rest", {"bad": "'unterminated and the rest"}, ""),
    ("t=(1, 'a b')", {"t": (1, "a b")}, ""),
    ("path=/v2/models/mlp:predict", {"path": "/v2/models/mlp:predict"}, ""),
    ("x=__import__('os')", {"x": "__import__('os')"}, ""),  # never evaluated
])
def test_parse(msg, pairs, words):
    got, text = parse(msg)
    assert {k: v for k, v, _ in got} == pairs
    assert text == words


def test_json_keeps_values_with_spaces_whole():
    r = record("event=load_failed servable=mlp:2 reason=%r", "load did not finish in 120s")
    doc = json.loads(JsonFormatter().format(r))
    assert doc["reason"] == "load did not finish in 120s"
    assert doc["event"] == "load_failed" and doc["servable"] == "mlp:2"
    assert doc["level"] == "info" and doc["logger"] == "splitserve.test"


def test_json_turns_literals_into_json_values():
    r = record("event=routing_changed config=%s ms=%s", {"labels": {"stable": 1}, "weights": {"stable": 90}}, 1.25)
    doc = json.loads(JsonFormatter().format(r))
    assert doc["config"] == {"labels": {"stable": 1}, "weights": {"stable": 90}}
    assert doc["ms"] == 1.25


def test_json_fields_never_overwrite_the_envelope():
    doc = json.loads(JsonFormatter().format(record("event=x level=mine logger=other")))
    assert doc["level"] == "info" and doc["level_"] == "mine" and doc["logger_"] == "other"


def test_kv_is_one_line_with_newlines_and_tracebacks():
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        exc = sys.exc_info()
    line = KvFormatter().format(record("event=boom error=%s detail=%r", "a\nb", "x\ny", exc_info=exc))
    assert "\n" not in line
    assert line.startswith("ts=") and " level=INFO logger=splitserve.test event=boom " in line
    pairs, _ = parse(line)
    got = {k: v for k, v, _ in pairs}
    assert got["detail"] == "x\ny"
    assert "Traceback" in got["exc"] and "ValueError: first\nsecond" in got["exc"]
    assert isinstance(got["ts"], str) and got["ts"].endswith("Z")  # one token, no space in it


def test_json_escapes_unicode_line_separators():
    line = JsonFormatter().format(record("event=x reason=%r", "a\u2028b\x85c"))
    assert len(line.splitlines()) == 1 and json.loads(line)["reason"] == "a\u2028b\x85c"


def test_one_line_leaves_clean_messages_alone():
    m = "event=x reason='a b' cfg={'a': 1}"
    assert one_line(m) is m


alphabet = st.characters(codec="utf-8", exclude_categories=("Cs",))
names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(names, st.text(alphabet, max_size=30), max_size=6))
def test_kv_round_trips_through_parse(fields):
    pairs, text = parse(kv(**fields))
    assert text == ""
    assert [k for k, _, _ in pairs] == list(fields)
    for (k, v, raw) in pairs:
        # a plain token comes back as itself (maybe as a number); anything else as the string
        assert (v if isinstance(v, str) else raw) == fields[k]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet, max_size=80))
def test_any_message_formats_as_one_line(msg):
    line = KvFormatter().format(record("%s", msg))
    assert len(line.splitlines()) == 1
    doc = JsonFormatter().format(record("%s", msg))
    assert len(doc.splitlines()) == 1
    json.loads(doc)  # never raises


def test_levels_are_checked():
    with pytest.raises(ValueError, match="log level must be one of"):
        set_level("loud")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", "xml")
    root = logging.getLogger("splitserve")
    saved = root.handlers[:], root.level, root.propagate
    try:
        setup_logging("debug", "json")
        assert root.level == logging.DEBUG and isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:], root.level, root.propagate = saved


# ---- fields as fields (issue 27): a `key=%X` argument is the field's value ---------------
from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

from runtime.logs import JsonFormatter as _Json, KvFormatter as _Kv, parse as _parse  # noqa: E402


def _record(msg, *args):
    return logging.LogRecord("splitserve.test", logging.INFO, __file__, 1, msg, args, None)


@hsettings(max_examples=300, deadline=None)
@given(st.text(), st.text())
def test_any_string_value_round_trips_through_the_json_log(a, b):
    line = _Json().format(_record("event=probe repository=%s reason=%r", a, b))
    assert "\n" not in line.replace("\\n", "")
    doc = json.loads(line)
    assert doc["repository"] == a and doc["reason"] == b and doc["event"] == "probe"


@hsettings(max_examples=300, deadline=None)
@given(st.text())
def test_any_string_value_is_one_kv_field(a):
    line = _Kv().format(_record("event=probe path=%s n=%d", a, 3))
    assert "\n" not in line and "\r" not in line
    pairs, words = _parse(line)
    got = {k: v for k, v, _ in pairs}
    assert got["n"] == 3 and got["event"] == "probe" and not words
    v = got["path"]
    # quoted values read back exactly; a bare token may read back typed (1, 2.5, True)
    assert v == a or (not isinstance(v, str) and str(v).lower() in a.lower() + str(_parse(f"x={a}")[0][0][1]).lower())


def test_a_path_with_a_space_is_one_json_field_not_two():
    line = _Json().format(_record("event=starting pid=%d repository=%s config=%s", 7, "/srv/my models", None))
    assert json.loads(line) == {**json.loads(line), "event": "starting", "pid": 7,
                                "repository": "/srv/my models", "config": None}
    assert "msg" not in json.loads(line)
    kv = _Kv().format(_record("event=starting repository=%s", "/srv/my models"))
    assert kv.endswith("repository='/srv/my models'")


def test_a_value_with_key_equals_inside_stays_one_field():
    doc = json.loads(_Json().format(_record("event=x value=%s", "a b=c")))
    assert doc["value"] == "a b=c" and "b" not in doc
