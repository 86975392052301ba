"""The alerts and the dashboard operators load as they are (examples/prometheus, examples/grafana):
the rules pass `promtool check rules` and their own `promtool test rules`, and every series they
and the dashboard use is one a real daemon exports on /metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import Daemon, free_port

REPO = Path(__file__).parent.parent
RULES = REPO / "examples" / "prometheus"
DASHBOARD = REPO / "examples" / "grafana" / "vfusefs.json"


def promtool() -> str:
    found = shutil.which("promtool") or REPO / ".cache" / "prometheus" / "usr" / "bin" / "promtool"
    if not Path(found).exists():
        pytest.skip("promtool is not here (make test takes it from Debian's prometheus package)")
    return str(found)


def test_the_alert_rules_check_and_pass_their_tests() -> None:
    tool = promtool()
    r = subprocess.run(
        [tool, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert r.returncode == 0 and "SUCCESS: 7 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def used_series(text: str) -> set[str]:
    return set(re.findall(r"\bvfusefs_[a-z_]+", text)) - {"vfusefs_"}


@pytest.mark.mount
def test_alerts_and_dashboard_use_series_the_daemon_exports(world_dir: Path) -> None:
    port = free_port()
    d = Daemon(world_dir, daemon_opts={"metrics_listen": f"127.0.0.1:{port}"}).start()
    try:  # a vfolder and a scope with limits, and some traffic, so every family has series
        scope = f"user:{uuid.uuid4()}"
        assert d.api("PUT", f"/v1/scopes/{scope}", {"quota_bytes": "1G"}).status_code == 200
        vf = d.vfolder(scope=scope, quota_bytes="1M")
        (vf / "f").write_text("x\n")
        (vf / "f").read_text()
        with pytest.raises(OSError):  # a refusal (EDQUOT): vfusefs_denied_total has a series
            (vf / "big").write_bytes(b"x" * (2 << 20))
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        assert d.stop() == 0
    exported = {
        line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line and line[0] != "#"
    }
    exported |= {name.rsplit("_bucket", 1)[0] for name in exported}
    rules = used_series((RULES / "alerts.yml").read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    panels = used_series(exprs) | used_series(json.dumps(dashboard["templating"]))
    assert rules and panels
    missing = {s for s in rules | panels if s not in exported and s + "_bucket" not in exported}
    assert not missing, f"used but not exported: {sorted(missing)}"


def test_doctor_says_when_op_timeout_would_abort_the_mount(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """fs.fuse.default_request_timeout aborts the whole connection on a late request: doctor
    fails a host whose op_timeout is not below it (the sysctl is 0 here: stood in for)."""
    from vfusefs import config
    from vfusefs.service import doctor

    cfg = config.parse(
        f'[hosts.a]\npath = "{tmp_path}"\nop_timeout = 30.0\n'
        f'[hosts.b]\npath = "{tmp_path}/b"\nop_timeout = 5.0\n',
        check_paths=False,
    )
    monkeypatch.setattr(doctor, "fuse_request_timeout", lambda: 20)
    (check,) = doctor.check_request_timeout(cfg)
    assert check.level == "fail" and "a (30 s)" in check.detail and "b (" not in check.detail
    monkeypatch.setattr(doctor, "fuse_request_timeout", lambda: 60)
    assert doctor.check_request_timeout(cfg)[0].level == "ok"
    monkeypatch.setattr(doctor, "fuse_request_timeout", lambda: 0)  # off: nothing to say
    assert doctor.check_request_timeout(cfg) == []
