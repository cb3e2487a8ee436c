"""The local multi-node cluster's own start-up failure path (:mod:`raymoe.jobs.local_cluster`): a head whose dashboard
does not answer in time is killed as a whole process session, started again on fresh ports, and the final error names
both tries; nothing of either try is left running. Environment errors (Ray token auth inherited by the nodes) fail
at once, with the reason and no retry."""
from __future__ import annotations

import os
import re
import time

import pytest

from raymoe.jobs import local_cluster
from raymoe.jobs.local_cluster import ClusterConfigError, LocalCluster


def test_a_head_that_does_not_answer_is_retried_on_fresh_ports_and_leaves_nothing(tmp_path, monkeypatch):
    spawned = []
    real_spawn = LocalCluster._spawn

    def spawn(self, *a, **kw):
        node = real_spawn(self, *a, **kw)
        spawned.append(node.pid)
        return node

    monkeypatch.setattr(LocalCluster, "_spawn", spawn)
    c = LocalCluster(tmp_path / "c", first_ip=95)
    try:
        # a deadline no head meets: ``ray start`` is still importing when it passes
        with pytest.raises(TimeoutError) as e:
            c.start(workers=0, timeout_s=0.5)
    finally:
        c.stop()
    msg = str(e.value)
    assert "did not start 2 times" in msg and "try 1:" in msg and "try 2:" in msg
    ports = re.findall(r"http://127\.0\.0\.1:(\d+) did not come up", msg)
    assert len(ports) == 2 and ports[0] != ports[1]  # the second try ran on fresh ports
    assert len(spawned) == 2 and c.nodes == []
    assert all(local_cluster._session_pids(pid) == [] for pid in spawned)  # whole sessions killed


def test_a_long_state_dir_gets_a_short_ray_temp_dir_and_the_head_starts(tmp_path):
    # pytest's tmp_path (~50 characters) + /ray is too long for the unix sockets Ray puts under its temp dir: the
    # dashboard's module subprocesses could not bind them and the head came up without a dashboard
    state = tmp_path / "a-state-directory-with-a-long-name"
    c = LocalCluster(state, first_ip=96)
    try:
        c.start(workers=0, timeout_s=120)
        assert len(str(state / "ray")) > 30 and len(str(c.ray_tmp)) <= 30 and c.ray_tmp.is_dir()
        assert c.alive_node_ips() == ["127.0.0.96"]
        assert LocalCluster.load(state).ray_tmp == c.ray_tmp  # `down` from another process cleans the same dir
    finally:
        c.stop()
    assert not c.ray_tmp.exists() and not state.exists()


@pytest.mark.parametrize("token_file", [False, True])
def test_nodes_that_want_a_token_are_refused_at_once_with_the_reason(tmp_path, token_file):
    # RAY_AUTH_MODE=token reaches the nodes when an earlier ray.init in the same process set it. Without a token file
    # `ray start` refuses to start the head; with one (ray.init writes ~/.ray/auth_token) the head starts and its
    # dashboard answers 401 to every call. Either way the start fails at once, naming the variable, with no retry
    # on fresh ports and nothing left behind
    token = tmp_path / "auth_token"
    if token_file:
        token.write_text(os.urandom(16).hex())
    c = LocalCluster(tmp_path / "t", first_ip=97,
                     extra_env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    t0 = time.time()
    try:
        with pytest.raises(ClusterConfigError, match="RAY_AUTH_MODE='token'") as e:
            c.start(workers=0, timeout_s=120)
        assert ("wants a token" if token_file else "no token was found") in str(e.value)
        assert time.time() - t0 < 100, "waited for the timeout instead of failing at once"
        assert c.nodes == []
    finally:
        c.stop()
