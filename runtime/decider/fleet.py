"""One experiment decider across the replicas of a `kubernetes://` routing ConfigMap, or
across the servers sharing one writable routing config file.

- Who decides: the holder of the lease: for a ConfigMap the Lease `<configmap>-decider`
  (runtime/decider/lease_k8s.py), renewed every duration/3; for a file the flock beside it
  (runtime/decider/lease_file.py), read every 0.5 s; synced from a thread. In each pod only its local decider (alone, the
  server; with `--workers N`, the worker holding the run folder's flock) takes part; the
  pod's identity is HOSTNAME plus a random id per start (with workers, kept in the run
  folder, so a new local decider is the same identity and no count is taken twice).
- Where state lives: the holder writes every experiment's state (ExperimentState.to_json,
  as the state file holds it), the judged-totals baseline per identity and its own URL
  (`splitserve.io/decider-url`) into the Lease's annotations, in the same
  resourceVersion-checked write as a renewal: a deposed holder cannot overwrite them.
  Followers show the state they read there, so GET .../experiment answers alike everywhere.
  (The file lease keeps the same annotations in a record file beside the config, the
  states in the config's `.experiments.json`.)
- Counts and records: each follower pushes, every PUSH_S and before forwarding feedback,
  its pod's cumulative per-arm counters (per version and routing share) and the decision
  records (with their share and sticky key) new since its last acknowledged push to
  `POST /v1/experiments/peers` at the holder's URL (token-protected, JSON). The holder
  keeps per-identity latest totals and judges the sum over identities of (totals -
  baseline), so a new holder carries on exactly and a dead pod's judged counts are never
  judged twice. A push also carries the sticky keys whose pod totals
  changed since the holder acknowledged them (`keys`: model -> fingerprint -> key ->
  [requests, errors, share, arm, time], cumulative, so a resent push changes nothing; read
  with every push while that takes under 5 % of the time, at least every KEYS_PUSH_S); the
  holder keeps each pod's (~150 bytes per key and pod) and sums them per key
  (runtime/decider/counts.py). A new holder takes the key totals it finds as judged.
- Feedback and actions at a follower go to the same endpoint, as the calls the workers
  send over their socket; a receiver that does not hold the Lease answers 503 ("not the
  experiment decider; retry"), it never forwards again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import http.client
import json
import logging
import os
import secrets
import socket
import time
import urllib.parse
from pathlib import Path

from runtime import errors
from runtime.errors import Code, ServingError
from runtime.decider.lease_file import FileLease
from runtime.decider.lease_k8s import Lease
from runtime.decider.counts import KEY_WIDTH, add_counts
from runtime.routing.k8s_api import KubeError

log = logging.getLogger("splitserve.experiments")

PUSH_S = 0.5  # a follower's counters and records reach the holder at least this often
PUSH_RECORDS = 20_000  # records per push (a push body stays well under MAX_PUSH_BYTES)
PUSH_KEYS = 20_000  # changed sticky keys per push (the rest go with the next ones)
PUSH_KEY_BYTES = 1 << 20  # and about this much of them (records take up to ~2 MiB more)
KEYS_PUSH_S = 30.0  # sticky keys' totals reach the holder at least this often (with every push while cheap)
MAX_PUSH_BYTES = 4 << 20
OUTBOX = 200_000  # records not yet acknowledged by the holder; the oldest are dropped beyond
FEEDBACK_WAIT_S = 2.0  # the holder waits this long for every live pod's next push
LIVE_S = 5.0  # an identity that pushed within this long is live
PRUNE_S = 120.0  # an identity silent this long, and fully judged, is forgotten
A_STATES, A_BASELINE, A_URL = "splitserve.io/experiments", "splitserve.io/baseline", "splitserve.io/decider-url"
NOT_DECIDER = "not the experiment decider; retry"
FORWARD_WAIT_S = 5.0  # a forwarded action or feedback waits this long for a reachable holder
RETRY_S = 0.2
SENT_NOTHING = 0  # _post's status when the connection failed before the call was sent


def pod_identity(run_dir: Path | None = None) -> str:
    """HOSTNAME (the pod name) plus an id per start; with workers, one per run folder."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    if run_dir is None:
        return f"{host}-{secrets.token_hex(4)}"
    path = Path(run_dir) / "fleet.id"
    tmp = path.with_name(f".fleet.id.{os.getpid()}")
    tmp.write_text(secrets.token_hex(4))
    try:  # a hard link appears whole: a worker never reads the id half-written
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink()
    return f"{host}-{path.read_text().strip()}"


def fit_states(states: dict[str, dict], budget: int | None) -> str:
    """The states as JSON within `budget` bytes (None: no cap): the oldest decisions are
    dropped (then said in the log) rather than the write refused; a state is never cut otherwise."""
    doc = {m: dict(s) for m, s in states.items()}
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    dropped = 0
    while budget is not None and len(text.encode()) > budget:
        longest = max(doc, key=lambda m: len(doc[m].get("decisions") or ()), default=None)
        if longest is None or not doc[longest].get("decisions"):
            raise ValueError(f"experiment states are {len(text.encode())} bytes without decisions, "
                             f"over the Lease's budget of {budget}")
        doc[longest]["decisions"] = doc[longest]["decisions"][1:]
        dropped += 1
        text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    if dropped:
        log.warning("event=experiment_decisions_trimmed dropped=%d reason='lease annotations budget %d bytes'",
                    dropped, budget)
    return text


def parse_push(call: dict) -> tuple[str, dict, list[tuple], dict]:
    """identity, {model: {tag: counts}}, records, keys of a pushed call; ValueError when malformed."""
    ident, models, records = call.get("identity"), call.get("models"), call.get("records", [])
    keys = call.get("keys") or {}
    if not isinstance(ident, str) or not 0 < len(ident) <= 256:
        raise ValueError("identity: expected a string of 1 to 256 characters")
    if not isinstance(models, dict) or not isinstance(records, list):
        raise ValueError("models: expected an object; records: a list")
    for m, counts in models.items():
        if not isinstance(counts, dict):
            raise ValueError(f"models.{m}: expected an object of version -> counts")
        for v, c in counts.items():
            version, _, share = str(v).partition("@")
            if not (version.isdigit() and _is_share(share) and isinstance(c, list) and len(c) == 4
                    and isinstance(c[3], list) and all(isinstance(x, int) for x in (*c[:3], *c[3]))):
                raise ValueError(f"models.{m}.{v}: expected version@share: [requests, errors, units, [histogram]]")
    out = []
    for r in records:
        if not (isinstance(r, list) and len(r) in (4, 6) and isinstance(r[0], str) and isinstance(r[1], str)
                and isinstance(r[2], int) and (r[3] is None or isinstance(r[3], str))
                and (len(r) == 4 or ((r[4] is None or _number(r[4])) and (r[5] is None or isinstance(r[5], str))))):
            raise ValueError("records: expected [request_id, model, version, arm or null, share or null, "
                             "key or null] items")
        out.append((r[0], r[1], r[2], r[3], *(r[4:6] if len(r) == 6 else (None, None))))
    if not isinstance(keys, dict) or not all(
            isinstance(specs, dict) and all(isinstance(ks, dict) and all(
                isinstance(k, str) and isinstance(v, list) and len(v) == KEY_WIDTH and all(map(_number, v))
                for k, v in ks.items()) for ks in specs.values()) for specs in keys.values()):
        raise ValueError("keys: expected {model: {fingerprint: {key: [requests, errors, share, arm, time]}}}")
    return ident, models, out, keys


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_share(text: str) -> bool:
    if not text:
        return True
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


class Fleet:
    """This process's side of the fleet (see the module docstring). Loop-only, except
    the Lease calls, which run in threads."""

    def __init__(self, lease: Lease | FileLease, *, token: str | None, advertise_url: str | None = None):
        """`lease`: who decides and where the state lives (a Lease or a FileLease, one interface)."""
        self.lease, self.token = lease, token
        self.identity = lease.identity
        self.advertise_url = advertise_url
        self.pushed: dict[str, dict] = {}  # identity -> {model: {tag: counts}} (holder)
        self.keys: dict[str, dict] = {}  # identity -> {model: {fingerprint: {key: totals}}} (holder)
        self.keys_acked: dict[tuple[str, str, str], list] = {}  # (model, spec, key) -> totals the holder has
        self.pushed_at: dict[str, float] = {}  # identity -> monotonic time of its last push
        self.baseline: dict[str, dict] = {}  # identity -> {model: {version: counts}} judged
        self.outbox: collections.deque = collections.deque(maxlen=OUTBOX)
        self._states_text: str | None = None  # what we hold, written with each renewal
        self._baseline_text = "{}"
        self._pushed_event = asyncio.Event()
        self._led_since: float | None = None
        self._failing = False  # the API server did not answer our last sync

    @property
    def name(self) -> str:
        return self.lease.title

    def use_run_folder(self, run_dir: Path) -> None:
        """With workers: one identity per pod start, whichever worker decides locally."""
        self.identity = self.lease.identity = pod_identity(run_dir)

    def bound(self, host: str, port: int) -> None:
        """The HTTP listener is bound: the URL the others reach us at, unless given."""
        if self.advertise_url is None:
            ip = os.environ.get("POD_IP") or host
            self.advertise_url = f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"

    # ---- the Lease ---------------------------------------------------------------------
    @property
    def leading(self) -> bool:
        return self.lease.leading

    def _annotations(self, holding: bool) -> dict[str, str]:
        """Our URL always; the states and baseline only once we hold it (taking it keeps
        what the last holder wrote: we load it first)."""
        out = {A_URL: self.advertise_url or ""}
        if holding and self._states_text is not None:
            out[A_STATES] = self._states_text
            out[A_BASELINE] = self._baseline_text
        return out

    def sync(self) -> bool:
        """One renewal or attempt to take the Lease (blocking). Never while our URL is
        unknown: the others could not reach us."""
        if self.advertise_url is None:
            return False
        was = self.lease.leading
        try:
            now = self.lease.sync(self._annotations(was))
        except (KubeError, OSError) as e:
            if not self._failing:  # once per outage, not every renewal
                status, why = (e.status, e.message) if isinstance(e, KubeError) else (0, str(e))
                log.warning("event=experiment_lease_failed lease=%s status=%d reason=%r",
                            self.lease.where, status, why)
            self._failing = True
            return self.lease.leading
        if self._failing:
            log.info("event=experiment_lease_resumed lease=%s holder=%s", self.lease.where, self.lease.holder)
        self._failing = False
        if was and not now:
            log.warning("event=experiment_lease_lost lease=%s holder=%s", self.lease.where, self.lease.holder)
        return now

    def taken(self) -> dict[str, dict]:
        """We hold the Lease now: the states and baseline its last holder wrote."""
        ann = self.lease.annotations()
        self._led_since = time.monotonic()
        self._states_text, self._baseline_text = None, ann.get(A_BASELINE) or "{}"
        try:
            self.baseline = json.loads(self._baseline_text)
        except ValueError:
            self.baseline = {}
        self.pushed, self.pushed_at, self.keys = {}, {}, {}
        return self.states()

    def states(self) -> dict[str, dict]:
        """The experiment states the holder last wrote ({} when none; a bad one is logged)."""
        text = self.lease.annotations().get(A_STATES)
        try:
            doc = json.loads(text) if text else {}
        except ValueError as e:
            log.error("event=experiment_state_unreadable lease=%s reason=%r", self.lease.where, str(e))
            return {}
        return doc if isinstance(doc, dict) else {}

    def states_mark(self) -> str | None:
        return self.lease.annotations().get(A_STATES)

    def stage(self, states: dict[str, dict]) -> None:
        """States and baseline as the Lease's next write carries them (on the loop: the
        thread that writes reads only these strings)."""
        self._baseline_text = json.dumps(self.baseline, separators=(",", ":"))
        budget = self.lease.budget
        self._states_text = fit_states(states, None if budget is None else budget - len(self._baseline_text) - 1024)

    # ---- counts, judged -----------------------------------------------------------------
    def received(self, identity: str, models: dict, keys: dict | None = None) -> None:
        self.pushed[identity] = models
        if keys:
            merge_keys_replace(self.keys.setdefault(identity, {}), keys)
        self.pushed_at[identity] = time.monotonic()
        self._pushed_event.set()

    def pushed_keys(self) -> list[dict]:
        """Every other pod's per-key totals (merge with counts.merge_keys)."""
        return [k for i, k in self.keys.items() if i != self.identity]

    def changed_keys(self, pod: dict) -> dict:
        """This pod's keys whose totals the holder does not have yet (at most PUSH_KEYS)."""
        out: dict = {}
        n = size = 0
        for model, specs in pod.items():
            for spec, keys in specs.items():
                for key, v in keys.items():
                    if self.keys_acked.get((model, spec, key)) != v:
                        out.setdefault(model, {}).setdefault(spec, {})[key] = v
                        n += 1
                        size += len(key) + 80
                        if n >= PUSH_KEYS or size >= PUSH_KEY_BYTES:  # the body stays under MAX_PUSH_BYTES
                            return out
        return out

    def judged_totals(self, model: str, own: dict[str, list]) -> tuple[dict[str, list], dict]:
        """(sum of every identity's totals, sum of their baselines) for `model`; the
        baselines become those totals (the caller judges the difference now)."""
        docs = {self.identity: {str(v): c for v, c in own.items()}}
        docs.update((i, m.get(model, {})) for i, m in self.pushed.items() if i != self.identity)
        cur: dict[int, list] = {}
        base: dict[int, list] = {}
        for ident, counts in docs.items():
            add_counts(cur, counts)
            add_counts(base, self.baseline.get(ident, {}).get(model, {}))
            self.baseline.setdefault(ident, {})[model] = copy.deepcopy(counts)
        self._prune()
        return cur, {str(v): c for v, c in base.items()}

    def _prune(self) -> None:
        """Forget an identity silent for PRUNE_S (since its last push, or since we took the
        Lease when it never pushed to us) once its last totals are judged: a dead pod."""
        now = time.monotonic()
        for ident in (set(self.baseline) | set(self.pushed)) - {self.identity}:
            if now - self.pushed_at.get(ident, self._led_since or now) <= PRUNE_S:
                continue
            judged = self.baseline.get(ident, {})
            if all(judged.get(m) == c for m, c in self.pushed.get(ident, {}).items() if m in judged):
                self.baseline.pop(ident, None)
                self.pushed.pop(ident, None)
                self.keys.pop(ident, None)
                self.pushed_at.pop(ident, None)

    def release(self) -> None:
        """At a graceful stop: give the Lease up, so the next holder need not wait it out."""
        try:
            self.lease.release(self._annotations(True))
        except (KubeError, OSError) as e:
            log.info("event=experiment_lease_release_failed lease=%s reason=%r", self.lease.where, str(e))

    async def wait_pushes(self, since: float, skip: str | None = None, timeout: float = FEEDBACK_WAIT_S) -> None:
        """Until every live identity (but `skip`, which pushed before it sent) has pushed
        after `since` (monotonic), or timeout."""
        deadline = since + timeout
        while True:
            now = time.monotonic()
            late = [i for i, at in self.pushed_at.items()
                    if i not in (self.identity, skip) and since > at > now - LIVE_S]
            if not late or now >= deadline:
                return
            self._pushed_event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pushed_event.wait(), deadline - now)

    # ---- follower -> holder ---------------------------------------------------------------
    def decider_url(self) -> str | None:
        return self.lease.annotations().get(A_URL) or None

    def push_call(self, models: dict, keys: dict | None = None) -> tuple[dict, int]:
        records = [list(r) for r in list(self.outbox)[:PUSH_RECORDS]]
        call = {"op": "push", "identity": self.identity, "models": models, "records": records}
        if keys:
            call["keys"] = keys
        return call, len(records)

    def acked(self, n: int, keys: dict | None = None) -> None:
        for _ in range(min(n, len(self.outbox))):
            self.outbox.popleft()
        for model, specs in (keys or {}).items():
            for spec, ks in specs.items():
                for key, v in ks.items():
                    self.keys_acked[(model, spec, key)] = v

    async def forward(self, call: dict, wait_s: float = FORWARD_WAIT_S) -> dict | None:
        """`call` applied at the holder: its answer ({"ok": ...}), or ServingError. While
        none can be reached and nothing was sent, the Lease is read again (a new holder
        is known from its next write) and the call retried, for up to `wait_s`. None once
        we hold it ourselves (a lone server right after start): the caller applies it."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.lease.leading:
                return None
            url = self.decider_url()
            if url and self.lease.holder != self.identity:
                status, answer = await asyncio.to_thread(self._post, url, call)
                if status != SENT_NOTHING and not (status == 503 and isinstance(answer, dict)
                                                   and answer.get("error") == NOT_DECIDER):
                    break
                why = (f"the experiment decider at {url} {answer['error']}" if status == SENT_NOTHING
                       else f"{url} is no longer the experiment decider")
            else:
                why = f"no experiment decider holds {self.name} right now"
            if time.monotonic() >= deadline:
                raise errors.unavailable(f"{why}; retry")
            await asyncio.sleep(RETRY_S)
            await asyncio.to_thread(self.sync)  # who holds it now, and where
        if status == 200 and isinstance(answer, dict) and "ok" in answer:
            return answer["ok"]
        if isinstance(answer, dict) and answer.get("code") in Code.__members__:
            raise ServingError(Code(answer["code"]), str(answer.get("error")))  # as the holder raised it
        raise errors.unavailable(f"the experiment decider at {url} answered {status}: "
                                 f"{answer.get('error') if isinstance(answer, dict) else answer!r}; retry")

    def _post(self, url: str, call: dict) -> tuple[int, object]:
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=10)
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        try:
            conn.request("POST", "/v1/experiments/peers", body=json.dumps(call, allow_nan=False), headers=headers)
        except OSError as e:
            conn.close()
            return SENT_NOTHING, {"error": f"is unreachable ({e})"}
        try:
            r = conn.getresponse()
            data = r.read(MAX_PUSH_BYTES)
        except OSError as e:
            raise errors.unavailable(f"the experiment decider at {url} did not answer ({e}); it may have "
                                     "been applied: read the experiment before retrying") from None
        finally:
            conn.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data[:200].decode("utf-8", "replace")


def merge_keys_replace(into: dict, keys: dict) -> None:
    """A pod's pushed key totals replace what it pushed before (they are cumulative)."""
    for model, specs in keys.items():
        for spec, ks in specs.items():
            into.setdefault(model, {}).setdefault(spec, {}).update(ks)


def make_fleet(settings, source) -> Fleet | None:
    """The fleet of a `kubernetes://` routing source (a Lease) or of a writable config file
    (a flock beside it: a lone server takes it at once and decides as it always did).
    None without a source, or for a read-only file: a ConfigMap volume (its replicas are
    pods on other hosts, which one flock cannot span; use `kubernetes://`) or a read-only
    mount, where neither the lock nor the state file can be written."""
    s, kind = settings.server, getattr(source, "kind", None)
    if kind == "kubernetes":
        lease = Lease(source.client, source.namespace, f"{source.configmap}-decider", pod_identity(),
                      s.experiment_lease_s)
    elif kind == "file" and source.writable:
        lease = FileLease(source.path, pod_identity(), A_STATES)
    else:
        return None
    return Fleet(lease, token=s.token, advertise_url=s.advertise_url)

