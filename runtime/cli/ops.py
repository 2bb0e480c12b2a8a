"""Operator subcommands of `splitserve`: status, route, publish, experiment.

They talk to a running server through its public HTTP API only (urllib, stdlib), except
`publish`, which is a filesystem operation on the repository: copy under a hidden name,
fsync, rename (with `--wait` it then follows the load through the API). Every failure is one readable line on stderr and a non-zero exit status
(1: the server or the filesystem refused; 2: the command line is wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"
MODEL_FILES = ("model.pt2", "model.safetensors", "model.pt")
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
EXPERIMENT_ACTIONS = ("status", "promote", "rollback", "pause", "resume", "retry")


class OpsError(Exception):
    """One line for the operator; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status  # the HTTP status, when the server answered


# ---- HTTP ------------------------------------------------------------------------------

class Api:
    """The server's JSON API: one request per call, errors as OpsError lines."""

    def __init__(self, base: str, token: str | None = None, timeout_s: float = 10.0):
        if not re.match(r"https?://", base):
            raise OpsError(f"--url must start with http:// or https://, got {base!r}", 2)
        self.base = base.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("accept", "application/json")
        if data is not None:
            req.add_header("content-type", "application/json")
        if self.token and method != "GET":
            req.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise OpsError(f"{method} {path}: {e.code} {_error_text(e.read()) or e.reason}",
                           status=e.code) from None
        except urllib.error.URLError as e:
            raise OpsError(f"cannot reach {self.base}: {e.reason}") from None
        except (TimeoutError, OSError) as e:
            raise OpsError(f"cannot reach {self.base}: {e}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise OpsError(f"{method} {path}: the answer is not JSON") from None


def _error_text(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").strip()[:300]
    return str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)


def _model_path(model: str) -> str:
    return "/v1/models/" + urllib.parse.quote(model, safe="")


# ---- status ------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def cmd_status(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    api = Api(args.url, timeout_s=args.timeout)
    index = api.call("POST", "/v2/repository/index", {})
    names = sorted({row["name"] for row in index})
    if args.model:
        if args.model not in names:
            raise OpsError(f"no model named {args.model!r} (models: {', '.join(names) or 'none'})")
        names = [args.model]
    header = ("MODEL", "VERSION", "STATE", "LABELS", "WEIGHT", "EFFECTIVE", "SHARE", "REQUESTS",
              "ERRORS", "ERROR_RATE", "P50_MS", "P99_MS")
    rows, notes, windows = [], [], set()
    for name in names:
        summary = api.call("GET", _model_path(name) + "/metrics")
        versions = summary.get("versions", [])
        if summary.get("model_config_error"):  # serving the last good file, or none
            notes.append(f"  {name} model.yaml: {' '.join(str(summary['model_config_error']).split())}")
        if not versions:
            unloaded = [r for r in index if r["name"] == name]
            why = unloaded[0].get("reason", "") if unloaded else ""
            rows.append((name, "-", "UNAVAILABLE", "-", "-", "-", "-", "0", "0", "-", "-", "-"))
            if why:
                notes.append(f"  {name}: {' '.join(why.split())}")
            continue
        # Every figure of a model's rows from one window: the recent one when the model saw
        # traffic in it, else the summary's (since the last routing change). Mixing them
        # showed REQUESTS 0 (since a routing change) beside SHARE 8.3% (recent).
        use_recent = any((v.get("recent") or {}).get("requests") for v in versions)
        windows.add(f"the last {summary.get('window_s', '?')} s" if use_recent else "since the last routing change")
        for v in versions:
            src = (v.get("recent") or {}) if use_recent else v
            lat = src.get("latency_ms") or {}
            rows.append((name, v["version"], v.get("state") or "-", ",".join(v.get("labels") or []) or "-",
                         _pct(v.get("configured_share")), _pct(v.get("expected_share")), _pct(src.get("observed_share")),
                         str(src.get("requests", 0)), str(src.get("errors", 0)), _pct(src.get("error_rate")),
                         _ms(lat.get("p50")), _ms(lat.get("p99"))))
            if v.get("state") == "FAILED" and v.get("reason"):
                notes.append(f"  {name} v{v['version']} FAILED: {' '.join(v['reason'].split())}")
    _table([header, *rows], out)
    if windows:
        print(f"(SHARE to P99_MS: {' or '.join(sorted(windows))}, per model)", file=out)
    if notes:
        print("\n".join(notes), file=out)
    return 0


def _table(rows: list[tuple], out) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


# ---- route -------------------------------------------------------------------------------

def _config_of(state: dict) -> dict:
    """The routing document minus what the server computes: what PUT takes back whole."""
    return {k: v for k, v in state.items()
            if k not in ("model", "effective", "note") and v not in (None, {}, [])}


def _parse_assignments(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise OpsError(f"{what}: expected NAME=VALUE, got {item!r}", 2)
        out.append((key.strip(), value.strip()))
    return out


def cmd_route(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    weights = []
    for key, value in _parse_assignments(args.weights, "weight"):
        try:
            w = float(value)
        except ValueError:
            raise OpsError(f"weight {key}={value}: expected a number >= 0", 2) from None
        if not w >= 0 or w == float("inf"):
            raise OpsError(f"weight {key}={value}: expected a finite number >= 0", 2)
        weights.append((key, int(w) if w.is_integer() else w))
    labels = []
    for key, value in _parse_assignments(args.label or [], "--label"):
        if not _VERSION_RE.fullmatch(value):
            raise OpsError(f"--label {key}={value}: expected a version number", 2)
        labels.append((key, int(value)))
    drops = args.drop or []
    if not weights and not labels and not drops:
        raise OpsError("nothing to change: name weights (stable=90 canary=10), --label or --drop", 2)
    api = Api(args.url, args.token, args.timeout)
    path = _model_path(args.model) + "/routing"
    config = _config_of(api.call("GET", path))
    if labels:
        config["labels"] = {**config.get("labels", {}), **dict(labels)}
    if weights or drops:
        new = dict(config.get("weights", {}))
        for key in drops:
            if new.pop(key, None) is None:
                raise OpsError(f"--drop {key}: no weight named {key!r} "
                               f"(weights: {', '.join(new) or 'none'})", 2)
        new.update(weights)
        config["weights"] = new
        if not new:
            del config["weights"]
    state = api.call("PUT", path, config)
    _show_routing(state, out)
    return 0


def _show_routing(state: dict, out) -> None:
    eff = state.get("effective") or {}
    labels = state.get("labels") or {}
    print(f"model {state.get('model')}: configured weights "
          + (" ".join(f"{k}={v}" for k, v in (state.get("weights") or {}).items()) or "none (latest version)"),
          file=out)
    if labels:
        print("labels: " + " ".join(f"{k}->{v}" for k, v in labels.items()), file=out)
    effw = eff.get("weights") or {}
    print("effective: " + (" ".join(f"v{v}={100 * w:.1f}%" for v, w in effw.items()) or "none"), file=out)
    if eff.get("pending_labels"):
        print("pending labels (moving once loaded): "
              + " ".join(f"{k}->{v}" for k, v in eff["pending_labels"].items()), file=out)
    for note in (eff.get("note"), state.get("note")):
        if note:
            print("note: " + note, file=out)


# ---- publish -----------------------------------------------------------------------------

def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _next_version(model_dir: Path) -> int:
    present = [int(p.name) for p in model_dir.iterdir() if _VERSION_RE.fullmatch(p.name)]
    return max(present, default=0) + 1


def cmd_publish(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    src, repo, model = Path(args.src), Path(args.repository), args.model
    if not src.is_dir():
        raise OpsError(f"{src} is not a directory")
    if not any((src / f).is_file() for f in MODEL_FILES):
        raise OpsError(f"{src} holds none of {', '.join(MODEL_FILES)}: not a version folder")
    if not repo.is_dir():
        raise OpsError(f"repository {repo} is not a directory")
    if not _NAME_RE.fullmatch(model):
        raise OpsError(f"--model {model!r}: expected a plain folder name (letters, digits, _ . -)", 2)
    if args.version is not None and not _VERSION_RE.fullmatch(args.version):
        raise OpsError(f"--version {args.version!r}: expected a positive integer without leading zeros", 2)
    api = Api(args.url) if args.wait else None  # a bad --url is refused before any copy
    model_dir = repo / model
    if model_dir.is_symlink():
        raise OpsError(f"{model_dir} is a symlink; the server does not follow those")
    model_dir.mkdir(exist_ok=True)
    # Copy under a hidden name the server ignores, on the same file system as the target.
    tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=model_dir))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, symlinks=False)
        for d, _, files in os.walk(tmp):
            for f in files:
                _fsync(Path(d) / f)
            _fsync(Path(d), directory=True)
        version = int(args.version) if args.version is not None else _next_version(model_dir)
        while True:
            target = model_dir / str(version)
            if target.exists() or target.is_symlink():
                if args.version is not None:
                    raise OpsError(f"{target} already exists: versions are never overwritten; "
                                   f"publish under a new number")
                version += 1
                continue
            try:
                # rename(2) also replaces an *empty* directory; one that appeared with files
                # in it since the check makes it fail, which is what we want.
                os.rename(tmp, target)
            except OSError as e:
                if args.version is None and target.exists():
                    version += 1  # another publisher took this number first
                    continue
                raise OpsError(f"could not publish {target}: {e.strerror}") from None
            break
        _fsync(model_dir, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"published {model} version {version} at {target}", file=out)
    if api is not None:
        _wait_loaded(api, model, version, args.timeout, out)
    return 0


WAIT_POLL_S = 0.2  # between reads of the server's summary while a version loads


def _wait_loaded(api: Api, model: str, version: int, timeout_s: float, out) -> None:
    """Until the server reports `version` AVAILABLE (one line on `out`) or FAILED (OpsError),
    polling its per-model summary; OpsError when `timeout_s` passes first. A 404 means the
    server has not scanned a brand-new model folder yet: keep waiting."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    last = "not seen by the server yet"
    while True:
        api.timeout_s = max(0.5, min(10.0, deadline - time.monotonic()))
        try:
            summary = api.call("GET", _model_path(model) + "/metrics")
        except OpsError as e:
            if e.status != 404:
                raise OpsError(f"published, but could not follow the load: {e}") from None
            summary = {}
        row = next((v for v in summary.get("versions", []) if str(v.get("version")) == str(version)), None)
        took = time.monotonic() - t0
        if row is not None:
            last = row.get("state") or "unknown"
            if last == "AVAILABLE":
                print(f"{model} version {version} AVAILABLE after {took:.1f}s", file=out)
                return
            if last == "FAILED":
                reason = " ".join(str(row.get("reason") or "no reason given").split())
                raise OpsError(f"{model} version {version} FAILED after {took:.1f}s: {reason}")
        if time.monotonic() >= deadline:
            raise OpsError(f"{model} version {version} not AVAILABLE within {timeout_s:g}s "
                           f"(last state: {last})")
        time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))


# ---- experiment --------------------------------------------------------------------------

def cmd_experiment(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    api = Api(args.url, args.token, args.timeout)
    path = _model_path(args.model) + "/experiment"
    try:
        if args.action == "status":
            doc = api.call("GET", path)
        else:
            doc = api.call("POST", f"{path}/{args.action}", {})
    except OpsError as e:
        if e.status == 404 and "no such endpoint" in str(e):
            raise OpsError(f"{args.model}: this server has no experiments endpoint "
                           f"(it predates experiments support)") from None
        raise
    if not isinstance(doc, dict):
        print(json.dumps(doc), file=out)
        return 0
    print("\n".join(format_experiment(args.model, doc)), file=out)
    return 0


def format_experiment(model: str, doc: dict) -> list[str]:
    """The experiment report (GET .../experiment) as lines for a terminal: the arms, each
    outcome's means, difference, interval and verdict, and each guardrail in words (the
    same words as the page, runtime/server/ui/app.js). Missing keys show as '-'."""
    lines = [f"experiment {model}: state {doc.get('state', '?')}, step {doc.get('step', '-')}, "
             f"candidate weight {doc.get('candidate_weight', '-')}"]
    for key in ("control", "candidate"):
        a = doc.get(key)
        if isinstance(a, dict):
            lines.append(f"  {key} {a.get('ref')} (v{a.get('version')}): {a.get('requests', 0)} requests, "
                         f"{a.get('errors', 0)} errors")
    cname, kname = _arm_name(doc.get("control"), "control"), _arm_name(doc.get("candidate"), "candidate")
    for o in doc.get("outcomes") or []:
        if isinstance(o, dict):
            goal = f" ({o['goal']})" if o.get("goal") else ""
            lines.append(f"  outcome {o.get('metric', '?')}{goal}: {cname} {_mean_n(o.get('control'))}, "
                         f"{kname} {_mean_n(o.get('candidate'))}; difference {difference_text(o)}; "
                         f"verdict {o.get('verdict') or '-'}")
    for name, g in (doc.get("guardrails") or {}).items():
        if isinstance(g, dict):
            lines.append(f"  guardrail {name}: {'ALARM' if g.get('alarm') else 'ok'}: "
                         f"{guardrail_text(name, g, cname, kname)}")
    srm = doc.get("srm")
    if isinstance(srm, dict) and srm.get("p_value") is not None:
        lines.append(f"  sample ratio: p={float(srm['p_value']):.3g}" + (" FLAGGED" if srm.get("flagged") else ""))
    for d in doc.get("decisions") or []:
        if isinstance(d, dict):
            when = d.get("time")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else ""
            by = f" ({d['by']})" if d.get("by") else ""
            lines.append(f"  {when} {d.get('action', '')}{by}: {d.get('reason', '')}".rstrip())
    return lines


def _num(v, digits: int = 4) -> str:
    return f"{float(v):.{digits}g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _arm_name(a, fallback: str) -> str:
    if not isinstance(a, dict) or a.get("ref") is None:
        return fallback
    return f"version {a['ref']}" if isinstance(a["ref"], int) else str(a["ref"])


def _mean_n(a) -> str:
    return f"{_num(a.get('mean'))} (n={a.get('n', 0)})" if isinstance(a, dict) else "-"


def difference_text(o: dict) -> str:
    """`+0.031 [-0.012, 0.074]`: the difference (candidate - control) and its interval."""
    d = o.get("difference")
    if not isinstance(d, (int, float)):
        return "not enough data yet"
    iv = o.get("interval")
    tail = f" [{_num(iv[0])}, {_num(iv[1])}]" if isinstance(iv, list) and len(iv) == 2 else ""
    return ("+" if d > 0 else "") + _num(d) + tail


def guardrail_text(name: str, g: dict, cname: str, kname: str) -> str:
    """What the guardrail compares, in words: `canary p99 vs 1.2 x stable's p99 = 3.1 ms:
    4 of 900 canary requests slower; evidence 0.8 (alarm at 20)`."""
    ev = (f"; evidence {_num(g['evidence'], 3)} (alarm at {_num(g.get('threshold'), 3)})"
          if isinstance(g.get("evidence"), (int, float)) else "")
    if name == "latency":
        q = g.get("quantile")
        q = f"p{float(q) * 100:.4g}" if isinstance(q, (int, float)) else "the quantile"
        t = g.get("latency_threshold_s")
        t = f" = {_num(t * 1000, 3)} ms" if isinstance(t, (int, float)) else ""
        slow = (f": {g.get('slow', 0)} of {g['judged']} {kname} requests slower"
                if isinstance(g.get("judged"), int) else "")
        return f"{kname} {q} vs {_num(g.get('max_ratio'))} x {cname}'s {q}{t}{slow}{ev}"
    if name == "errors":
        return f"{kname} error rate vs {_num(g.get('max_ratio'))} x {cname}'s error rate{ev}"
    return " ".join(f"{k}={v}" for k, v in g.items() if k != "alarm")


# ---- wiring into runtime/cli/main.py ---------------------------------------------------------

def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_subcommands(sub) -> None:
    """Register the operator subcommands on `splitserve`'s subparsers."""
    url_help = f"server base URL (default: $SPLITSERVE_URL, else {DEFAULT_URL})"
    token_help = "bearer token for state changes (default: $SPLITSERVE_TOKEN)"

    def common(p, token: bool):
        p.add_argument("--url", default=os.environ.get("SPLITSERVE_URL", DEFAULT_URL), help=url_help)
        p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default 10)")
        if token:
            p.add_argument("--token", default=os.environ.get("SPLITSERVE_TOKEN"), help=token_help)

    s = sub.add_parser("status", help="table of models, versions, states, weights, shares, latency",
                       description="Show every model's versions: state, labels, configured and "
                                   "effective weight, observed share, requests, errors, p50/p99 "
                                   "(over the server's recent window when it saw traffic).")
    s.add_argument("--model", help="only this model")
    common(s, token=False)
    s.set_defaults(ops=cmd_status)

    r = sub.add_parser("route", help="change weights or labels of a model's routing",
                       description="Read the model's routing, change what is named, write it "
                                   "back whole, and show the effective result. KEY=WEIGHT "
                                   "pairs come right after MODEL. Example: "
                                   "splitserve route mlp stable=90 canary=10 --label canary=3")
    r.add_argument("model", help="model name")
    r.add_argument("weights", nargs="*", metavar="KEY=WEIGHT",
                   help="weight per label or version number (other weights are kept)")
    r.add_argument("--label", action="append", metavar="LABEL=VERSION", help="point a label at a version")
    r.add_argument("--drop", action="append", metavar="KEY", help="remove a weight key")
    common(r, token=True)
    r.set_defaults(ops=cmd_route)

    p = sub.add_parser("publish", help="publish a version folder into the repository atomically",
                       description="Copy SRC_DIR to a hidden name inside the model folder, fsync "
                                   "it, and rename it to the version number (the next free one "
                                   "unless --version). Never overwrites a version.")
    p.add_argument("src", metavar="SRC_DIR")
    p.add_argument("--repository", required=True, help="the model repository the server watches")
    p.add_argument("--model", required=True, help="model folder name (created if missing)")
    p.add_argument("--version", help="version number (default: one above the highest present)")
    p.add_argument("--wait", action="store_true",
                   help="then wait until the server reports the version AVAILABLE or FAILED; "
                        "exit 1 on FAILED or timeout")
    p.add_argument("--url", default=os.environ.get("SPLITSERVE_URL", DEFAULT_URL),
                   help=f"with --wait: {url_help}")
    p.add_argument("--timeout", type=_positive, default=120.0,
                   help="with --wait: seconds to wait for the load (default 120)")
    p.set_defaults(ops=cmd_publish)

    e = sub.add_parser("experiment", help="show or steer a model's experiment",
                       description="Show the experiment's state, guardrails and decisions, or "
                                   "promote, roll back, pause, resume or retry it (servers with "
                                   "experiments support).")
    e.add_argument("model", help="model name")
    e.add_argument("action", choices=EXPERIMENT_ACTIONS)
    common(e, token=True)
    e.set_defaults(ops=cmd_experiment)


def run(args: argparse.Namespace) -> int:
    try:
        return args.ops(args)
    except OpsError as e:
        print(f"splitserve {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
