"""The experiment decider's Lease (runtime/decider/lease_k8s.py) against the loopback API
server (tests/k8s/kubeapi.py): taken when absent, renewed by its holder, never taken while
renewed, taken after a whole duration without a renewal, lost on a conflicting write (a
deposed holder's annotations are refused), no longer led after a duration of failed
renewals, and released for the next holder at once. Clocks are the test's own (no sleeps)."""

from __future__ import annotations

import pytest

from kubeapi import KubeAPI
from runtime.decider.lease_k8s import Lease
from runtime.routing.k8s_api import KubeClient, KubeError

NS, NAME = "serving", "routing-decider"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def api(tmp_path):
    a = KubeAPI(token="sa-token")
    (tmp_path / "token").write_text("sa-token\n")
    a.token_file = str(tmp_path / "token")
    yield a
    a.close()


def lease(api, identity: str, clock: Clock, duration: float = 3.0) -> Lease:
    return Lease(KubeClient(api.url, api.token_file), NS, NAME, identity, duration, mono=clock)


def test_taken_when_absent_renewed_by_its_holder_and_not_taken_while_renewed(api):
    ca, cb = Clock(), Clock()
    a, b = lease(api, "pod-a-1", ca), lease(api, "pod-b-1", cb)
    assert api.lease(NS, NAME) is None
    assert a.sync({"splitserve.io/decider-url": "http://10.0.0.1:8000"}) and a.leading
    obj = api.lease(NS, NAME)
    assert obj["spec"]["holderIdentity"] == "pod-a-1" and obj["spec"]["leaseTransitions"] == 0
    assert obj["spec"]["leaseDurationSeconds"] == 3 and obj["spec"]["acquireTime"].endswith("Z")
    for _ in range(5):  # a renews within the duration; b watches it change and never takes it
        ca.t += 1.0
        cb.t += 1.0
        assert not b.sync() and not b.leading and b.holder == "pod-a-1"
        assert a.sync()
    assert b.annotations()["splitserve.io/decider-url"] == "http://10.0.0.1:8000"
    assert api.lease(NS, NAME)["spec"]["holderIdentity"] == "pod-a-1"


def test_taken_after_a_duration_without_renewal_and_the_old_holder_is_deposed(api):
    ca, cb = Clock(), Clock()
    a, b = lease(api, "pod-a-1", ca), lease(api, "pod-b-1", cb)
    assert a.sync({"splitserve.io/experiments": '{"mlp": 1}'})
    assert not b.sync()  # first sight of this resourceVersion
    cb.t += 2.9
    assert not b.sync()  # not yet a whole duration
    cb.t += 0.2
    assert b.sync() and b.leading  # a never renewed: taken, and a's annotations kept
    obj = api.lease(NS, NAME)
    assert obj["spec"]["holderIdentity"] == "pod-b-1" and obj["spec"]["leaseTransitions"] == 1
    assert obj["metadata"]["annotations"]["splitserve.io/experiments"] == '{"mlp": 1}'
    assert not a.sync({"splitserve.io/experiments": '{"mlp": "stale"}'}) and not a.leading
    assert api.lease(NS, NAME)["metadata"]["annotations"]["splitserve.io/experiments"] == '{"mlp": 1}'


class Racing(KubeClient):
    """A client whose first PUT finds the Lease written by someone else since its GET."""

    def __init__(self, api, *a):
        super().__init__(*a)
        self.api = api

    def call(self, method, path, body=None, timeout=10):
        if method == "PUT" and self.api is not None:
            api, self.api = self.api, None
            with api.cond:
                cur = api.leases[(NS, NAME)]
                api._store_lease((NS, NAME), {"metadata": {"annotations": {"other": "wrote"}}, "spec": cur["spec"]})
        return super().call(method, path, body, timeout)


def test_a_conflicting_write_loses_the_lease_and_writes_nothing(api):
    c = Clock()
    a = lease(api, "pod-a-1", c)
    assert a.sync()
    a.client = Racing(api, api.url, api.token_file)
    conflicts = api.lease_conflicts
    assert not a.sync({"splitserve.io/experiments": "mine"}) and not a.leading
    assert api.lease_conflicts == conflicts + 1
    assert api.lease(NS, NAME)["metadata"]["annotations"] == {"other": "wrote"}
    assert a.sync()  # our own identity, read afresh: renewed again
    b = lease(api, "pod-b-1", Clock())  # a POST racing an existing Lease: 409, not taken
    b._sync = lambda ann: b._create(ann, 0.0)
    assert not b.sync() and api.lease(NS, NAME)["spec"]["holderIdentity"] == "pod-a-1"


def test_a_holder_that_cannot_renew_for_a_duration_stops_leading(api):
    c = Clock()
    a = lease(api, "pod-a-1", c)
    assert a.sync()
    api.down = True
    c.t += 1.0
    with pytest.raises(KubeError) as e:
        a.sync()
    assert e.value.status == 503
    assert a.leading  # still within the duration of the last renewal's start
    c.t += 2.01
    assert not a.leading  # a whole duration: no longer decides (another may take it now)
    api.down = False
    assert a.sync() and a.leading


def test_released_lease_is_taken_at_once(api):
    ca, cb = Clock(), Clock()
    a, b = lease(api, "pod-a-1", ca), lease(api, "pod-b-1", cb)
    assert a.sync() and not b.sync()
    a.release({"splitserve.io/experiments": "last"})
    assert not a.leading and api.lease(NS, NAME)["spec"]["holderIdentity"] is None
    assert b.sync() and api.lease(NS, NAME)["metadata"]["annotations"]["splitserve.io/experiments"] == "last"
