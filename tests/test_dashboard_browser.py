"""Issue 14, in a real browser: the dashboard follows real QEMU machines while its page stays open.

One lab serves every test of this module (CI time is a budget: two machines, two boots and a
half). A home router (dnsmasq), the agent in proxy mode and a laptop with headless Chromium sit
on one segment, with two BIOS machines that PXE-boot the test OS:

- ``stranger`` is not in lab.toml ([boot] unknown = "discover" boots it anyway): it is powered
  on once the page is open, appears on it without a reload, boots to ``up`` while its machine
  view is open, and is enrolled from the page's form;
- ``node7`` is in lab.toml with the qemu power driver and starts powered off. With the boot HTTP
  port blocked by nftables (as in test_doctor), the page's Power on button starts it: its boot
  stops after iPXE and the page shows the doctor's verdict. Then the firewall goes; SeaBIOS
  retries the network boot (its "retry boot" setting) and the same `on` is seen done when the
  OS phones home, as the page shows; Power off is then seen done by the qemu driver.

The tests run in file order; one that builds on an earlier one's step fails at once, naming
it, when that step failed. Waits are on the page's state (browser.Browser.wait_for:
WebDriverWait), never sleeps; each is bounded. Screenshots of each view go to
out/screenshots/dashboard-vm-*.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import netlab
import pytest
import vmlab
from agentproc import RunningAgent, start_agent
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

if TYPE_CHECKING:  # imported at run time inside the fixture, after pytest_plugins
    from browser import Browser

#: browser.py's fixtures (this module builds its own module-wide browser from browser.Browser).
pytest_plugins = ["browser"]

SUBNET = "10.94.0.0/24"
ROUTER_IP = "10.94.0.1"
AGENT_IP = "10.94.0.2"
LAPTOP_IP = "10.94.0.9"
RANGE = ("10.94.0.100", "10.94.0.150")
ORIGIN = f"http://{AGENT_IP}:8080"
API = "http://127.0.0.1:8080/api/v1"  # the same API, from the agent's own namespace (curl)
STRANGER = "52:54:00:94:00:01"
NODE = "node7"
NODE_MAC = "52:54:00:94:00:02"
#: Power-on to phone-home of a PXE boot of the test OS under TCG: about 40 s on an idle 2-core
#: machine; the margin is for a loaded one (and stays within pytest-timeout's 300 s a test).
BOOT_WAIT = 200.0
#: SeaBIOS's pause before it retries a failed network boot: longer than the doctor's settle
#: time (30 s after iPXE's last request), so the verdict is shown before the retry starts.
BOOT_RETRY = 45.0
NFT_TABLE = "pxbdashboard"
SCREENSHOT = "dashboard-vm"


def lab_config(workdir: Path, testos: tuple[Path, Path], qmp: Path) -> str:
    """lab.toml with comments everywhere: full lines, trailing, inside sections, at the end."""
    assets = workdir / "assets"
    (assets / "testos").mkdir(parents=True)
    for source in testos:
        shutil.copyfile(source, assets / "testos" / source.name)
    return f"""# Pixiebox lab for the dashboard's browser tests.
# Every comment here must survive an enrollment from the page.

[lab]
name = "dashboard-test"  # the lab's name, for people
domain = "lab.test"

[network]
# proxy mode: the home router (dnsmasq) hands out the addresses
interface = "eth0"
subnet = "{SUBNET}"
dhcp_mode = "proxy"

[boot]
unknown = "discover"  # strangers boot the default image, and wait to be enrolled
assets = "{assets}"

[images.osie]
# The small test OS stands in for the OSIE.
kernel = "testos/vmlinuz"
initrd = ["testos/initrd"]
cmdline = "console=ttyS0"

[http]
listen = ":80"

[api]
token_file = "{workdir / "api-token"}"

[power]
# The broken boot, SeaBIOS's retry and the good boot all fall in one `on`.
on_timeout = "600s"
off_timeout = "60s"

[state]
dir = "{workdir / "state"}"

# The rack.
[[machines]]
name = "{NODE}"
mac = "{NODE_MAC}"  # the second QEMU machine
power = {{ driver = "qemu", qmp = "{qmp}" }}
# End of the machines.
"""


def comments(text: str) -> list[str]:
    """Every comment of a lab.toml: full comment lines, and the `# ...` tail of the others."""
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            found.append(stripped)
        elif " # " in line or "  #" in line:
            found.append("#" + line.split("#", 1)[1])
    return found


@dataclass
class Lab:
    """The shared lab: hosts, agent, machines, browser, and the steps done so far."""

    segment: netlab.Segment
    agent_host: netlab.Host
    agent: RunningAgent
    page: Browser
    stranger: vmlab.VM
    node: vmlab.VM
    token: str
    workdir: Path
    done: set[str] = field(default_factory=set)
    marker: str = "pixiebox-page-never-reloaded"

    def need(self, *steps: str) -> None:
        """Fail at once, naming it, when a step this test builds on failed before."""
        missing = [step for step in steps if step not in self.done]
        if missing:
            pytest.fail(f"needs the earlier step(s) {missing}, which failed", pytrace=False)

    @property
    def driver(self) -> WebDriver:
        return self.page.driver

    def api(self, path: str) -> Any:
        """GET the agent's API from its own namespace (reads are open)."""
        out = self.agent_host.run(["curl", "-sS", "--fail", "--max-time", "10", f"{API}{path}"])
        return json.loads(out.stdout)

    def cli(self, *args: str) -> str:
        result = self.agent_host.run(
            [sys.executable, "-m", "pixiebox.cli", *args, "--config", str(self.agent.config)],
            timeout=60, check=False,
        )  # fmt: skip
        assert "Traceback" not in result.stderr, result.stderr
        return result.stdout + result.stderr

    def mark_page(self) -> None:
        """A value only this page load holds: gone if the page ever reloads."""
        self.driver.execute_script(f"window.pixieboxTestMarker = {self.marker!r};")

    def assert_not_reloaded(self) -> None:
        value = self.driver.execute_script("return window.pixieboxTestMarker || null;")
        assert value == self.marker, "the page was reloaded (the test's marker is gone)"

    def go(self, route: str) -> None:
        """Follow a link of the page to a hash route (no reload), as a person clicks it."""
        link = self.visible(f'a[href="{route}"]')
        if link is not None:
            link.click()
        else:  # no visible link (e.g. the machine's own view): the address bar, no reload
            self.driver.execute_script("window.location.hash = arguments[0];", route)
        self.page.wait_for(
            lambda d: d.execute_script("return window.location.hash;") == route,
            f"the page showing {route}",
        )

    def visible(self, css: str) -> WebElement | None:
        """The first displayed element matching ``css``, or None (also when the page redrew it
        between finding and asking)."""
        for element in self.driver.find_elements(By.CSS_SELECTOR, css):
            try:
                if element.is_displayed():
                    return element
            except StaleElementReferenceException:
                continue
        return None

    def wait_visible(self, css: str, timeout: float = 20.0) -> WebElement:
        found = self.page.wait_for(lambda d: self.visible(css), f"{css!r} shown", timeout)
        assert found is not None
        return found

    def attribute(self, css: str, name: str) -> str | None:
        """An attribute of the first element matching ``css`` (read in one script: the page
        redraws whole lists, an element found first could be gone when asked)."""
        value = self.driver.execute_script(
            "const e = document.querySelector(arguments[0]);"
            "return e ? e.getAttribute(arguments[1]) : null;",
            css, name,
        )  # fmt: skip
        return None if value is None else str(value)

    def sign_in(self) -> None:
        """Sign in with the API token through the header's button (if not signed in yet)."""
        if self.attribute("html", "data-signed-in") == "true":
            return
        self.wait_visible("button#signin").click()
        self.submit_token(self.token)

    def submit_token(self, token: str) -> None:
        form = self.wait_visible("form#signin-form")
        field = form.find_element(By.CSS_SELECTOR, "input[name=token]")
        assert field.get_attribute("type") == "password"
        field.clear()
        field.send_keys(token)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        if token == self.token:
            self.page.wait_for(
                lambda d: self.attribute("html", "data-signed-in") == "true",
                "html data-signed-in=true",
            )

    def text_of(self, css: str) -> str:
        """The text of the first element matching ``css``, shown or not (textContent)."""
        value = self.driver.execute_script(
            "const e = document.querySelector(arguments[0]);return e ? e.textContent : '';",
            css,
        )
        return str(value or "").strip()

    def lab_toml(self) -> str:
        return self.agent.config.read_text()

    def diagnostics(self) -> str:
        return (
            f"{self.stranger.tails()}\n{self.node.tails()}\n"
            f"----- agent log tail -----\n{self.agent.text()[-4000:]}\n"
            f"----- browser console -----\n{self.page.console()[-10:]}"
        )


def _prerequisites() -> str | None:
    from browser import browser_problem

    return (
        netlab.prerequisite_problem(("dnsmasq", "curl", "nft", vmlab.QEMU))
        or vmlab.prerequisite_problem("bios")
        or browser_problem()
    )


@pytest.fixture(scope="module")
def lab(testos: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The agent, the router, the laptop's browser with the machines page open, `node7`
    (powered off) and `stranger` (powered on once the page is open)."""
    problem = _prerequisites()
    if problem:
        if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
            pytest.fail(f"CI=true but a prerequisite is missing: {problem}", pytrace=False)
        pytest.skip(problem)
    from browser import Browser

    tmp = tmp_path_factory.mktemp("dashboard-vm")
    workdir = tmp / "work"
    workdir.mkdir()
    segment = netlab.Segment(tmp / "netlab")
    page: Browser | None = None
    agent_host: netlab.Host | None = None
    try:
        router = segment.add_host("router", ip=f"{ROUTER_IP}/24")
        netlab.start_dnsmasq_router(router, *RANGE, ping_check=False)
        node = vmlab.start_vm(
            segment, NODE, NODE_MAC, firmware="bios", workdir=workdir, powered_on=False,
            boot_retry=BOOT_RETRY,
        )  # fmt: skip
        assert node.qmp is not None
        agent_host = segment.add_host("agent", ip=f"{AGENT_IP}/24")
        agent = start_agent(agent_host, lab_config(workdir, testos, node.qmp), workdir)
        token = (workdir / "api-token").read_text().strip()
        page = Browser(segment.add_host("laptop", ip=f"{LAPTOP_IP}/24"), tmp / "browser")
        page.open(f"{ORIGIN}/")
        page.wait_for(
            lambda d: d.find_elements(By.CSS_SELECTOR, f'#rows tr[data-mac="{NODE_MAC}"]'),
            f"the machines page listing {NODE}",
        )
        page.wait_for(
            lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live",
            "the page's event stream open (#live data-state=live)",
        )
        stranger = vmlab.start_vm(segment, "stranger", STRANGER, firmware="bios", workdir=workdir)
        lab = Lab(segment, agent_host, agent, page, stranger, node, token, workdir)
        lab.mark_page()
        yield lab
    finally:
        if page is not None:
            page.close()
        if agent_host is not None:
            agent_host.run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)
        segment.close()  # QEMU, dnsmasq, the agent, the namespaces


@pytest.fixture(autouse=True)
def _diagnostics_on_failure(request: pytest.FixtureRequest, lab: Lab) -> Iterator[None]:
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        print(lab.diagnostics())
        try:
            lab.page.screenshot(f"{SCREENSHOT}-failed-{request.node.name}")
        except Exception as exc:  # a crashed browser: the logs above are what is left
            print(f"no screenshot of the failure: {exc}")


def row_css(mac: str) -> str:
    return f'#rows tr[data-mac="{mac}"]'


def stage_bar(driver: WebDriver) -> dict[str, str]:
    """The machine view's stage bar: stage -> status (read in one script, as it is redrawn)."""
    bar = driver.execute_script(
        "const bar = {};"
        "for (const li of document.querySelectorAll('ol#stagebar > li[data-stage]'))"
        "  bar[li.dataset.stage] = li.dataset.status;"
        "return bar;"
    )
    return {str(k): str(v) for k, v in dict(bar or {}).items()}


def timeline_macs(driver: WebDriver) -> set[str]:
    macs = driver.execute_script(
        "return [...document.querySelectorAll('#timeline [data-mac]')].map(e => e.dataset.mac);"
    )
    return {str(mac) for mac in macs or []}


# --------------------------------------------------------------------------- the tests


def test_an_unknown_pxe_client_appears_on_the_open_page(lab: Lab) -> None:
    row = row_css(STRANGER)

    def appeared(driver: WebDriver) -> str | None:
        state = lab.attribute(row, "data-state")
        return state if state in {"discovered", "booting"} else None

    state = lab.page.wait_for(appeared, f"a row for {STRANGER} (discovered or booting)", 120)
    lab.assert_not_reloaded()
    print(f"\n{STRANGER} appeared as {state} {lab.stranger.elapsed():.1f} s after power-on")
    lab.page.screenshot(f"{SCREENSHOT}-machines-discovered")
    lab.done.add("discovered")


def test_its_stages_advance_live_to_up_on_the_machine_view(lab: Lab) -> None:
    lab.need("discovered")
    lab.go(f"#/machines/{STRANGER}")
    lab.page.wait_for(
        lambda d: STRANGER in lab.text_of("#machine-title").lower(),
        f"#machine-title naming {STRANGER}",
    )
    seen: list[dict[str, str]] = []

    def up(driver: WebDriver) -> bool:
        bar = stage_bar(driver)
        if bar and (not seen or seen[-1] != bar):
            seen.append(bar)
        return bar.get("up") == "done"

    lab.page.wait_for(up, 'the stage bar\'s "up" done', BOOT_WAIT)
    lab.assert_not_reloaded()
    print(f"\n{STRANGER}: stage bar up {lab.stranger.elapsed():.1f} s after power-on")
    assert "PIXIEBOX-TESTOS: up" in lab.stranger.console_text()
    # Live: the bar was drawn before the boot ended, and changed as it went.
    assert len(seen) >= 2 and seen[0].get("up") != "done", seen
    final = seen[-1]
    for stage in ("dhcp", "script", "kernel", "initrd"):
        assert final.get(stage) == "done", final
    lab.page.screenshot(f"{SCREENSHOT}-machine-up")
    lab.go("#/")
    lab.page.wait_for(
        lambda d: lab.attribute(row_css(STRANGER), "data-state") == "up",
        f"{STRANGER}'s row in state up",
    )
    assert lab.api(f"/machines/{STRANGER}")["state"] == "up"
    lab.page.screenshot(f"{SCREENSHOT}-machines-up")
    lab.done.add("up")


def test_a_wrong_token_is_refused_and_nothing_changes(lab: Lab) -> None:
    before = lab.lab_toml()
    events_before = len(lab.api(f"/machines/{NODE}/events"))
    lab.wait_visible("button#signin").click()
    lab.submit_token("not-the-token-" + lab.token[:4])
    form = lab.wait_visible("form#signin-form")
    error = lab.wait_visible("#signin-error")
    lab.page.wait_for(lambda d: error.text.strip(), "a sentence in #signin-error")
    print(f"\nrefusal shown: {error.text!r}")
    assert "token" in error.text.lower(), error.text
    assert error.get_attribute("role") == "alert"
    lab.page.screenshot(f"{SCREENSHOT}-signin-refused")
    # Nothing changed: no session (cookie or server's word), the same lab.toml, no action.
    assert lab.attribute("html", "data-signed-in") == "false"
    assert lab.driver.get_cookie("pixiebox_session") is None
    session = lab.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/v1/session', {credentials: 'same-origin'})"
        ".then(r => r.json()).then(done, e => done({error: String(e)}));"
    )
    assert session == {"signed_in": False}, session
    assert lab.visible("button#signout") is None
    assert lab.lab_toml() == before
    assert len(lab.api(f"/machines/{NODE}/events")) == events_before
    # Only the refusal itself is recorded, in the lab's own log, with who asked.
    refusals = [e for e in lab.api("/lab/events") if e["kind"] == "api.refused"]
    assert [e["fields"]["source"] for e in refusals] == [LAPTOP_IP], refusals
    # Close the form again (its Cancel button) for the next test.
    cancel = form.find_elements(By.CSS_SELECTOR, "button[data-close]")
    if cancel and cancel[0].is_displayed():
        cancel[0].click()
    lab.done.add("refused")


def test_enrolling_from_the_form_keeps_every_comment_and_names_the_row(lab: Lab) -> None:
    lab.need("up")
    before = lab.lab_toml()
    lab.go("#/")
    row = row_css(STRANGER)
    lab.wait_visible(f"{row} button.enroll").click()
    # Signed out: the Enroll button asks for the sign-in first.
    lab.submit_token(lab.token)
    cookie = lab.driver.get_cookie("pixiebox_session")
    assert cookie is not None and cookie.get("httpOnly") is True, cookie
    assert lab.visible("button#signout") is not None and lab.visible("button#signin") is None
    if lab.visible("form#enroll-form") is None:  # the form did not open by itself
        lab.wait_visible(f"{row} button.enroll").click()
    enroll = lab.wait_visible("form#enroll-form")
    name_field = enroll.find_element(By.CSS_SELECTOR, "input[name=name]")
    proposed = lab.api(f"/machines/{STRANGER}/enroll")
    lab.page.wait_for(
        lambda d: name_field.get_attribute("value") == proposed["name"],
        f"the name prefilled with {proposed['name']!r}",
    )
    ip_value = enroll.find_element(By.CSS_SELECTOR, "input[name=ip]").get_attribute("value")
    assert ip_value == (proposed["ip"] or ""), (ip_value, proposed)
    name = "worker1"
    name_field.clear()
    name_field.send_keys(name)
    lab.page.screenshot(f"{SCREENSHOT}-enroll-form")
    enroll.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    lab.page.wait_for(
        lambda d: lab.text_of(f"{row} .name") == name, f"{STRANGER}'s row named {name}"
    )
    lab.assert_not_reloaded()
    after = lab.lab_toml()
    assert re.search(rf'(?m)^name = "{name}"$', after) and STRANGER in after.lower(), after
    kept = comments(after)
    lost = [line for line in comments(before) if line not in kept]
    assert not lost, f"comments lost by the enrollment: {lost}\n{after}"
    assert lab.api(f"/machines/{STRANGER}")["name"] == name
    lab.page.screenshot(f"{SCREENSHOT}-machines-enrolled")
    lab.done.add("enrolled")


def test_a_broken_boot_shows_the_doctors_verdict(lab: Lab) -> None:
    lab.sign_in()
    # A firewall on the appliance drops the boot HTTP server's port (the API's 8080 stays open).
    lab.agent_host.run(["nft", "-f", "-"], input=f"table inet {NFT_TABLE} {{\n chain in {{\n"
                       "  type filter hook input priority 0; policy accept;\n"
                       "  tcp dport 80 drop\n }\n}\n")  # fmt: skip
    lab.go("#/")
    lab.go(f"#/machines/{NODE_MAC}")
    lab.wait_visible('button[data-power="on"]').click()
    lab.wait_visible("#power-outcome")  # the `on` is under way
    verdict_css = "#verdict"

    def stalled(driver: WebDriver) -> str | None:
        if lab.attribute(verdict_css, "data-ok") != "false":
            return None
        text = lab.text_of(verdict_css)
        return text if "never the script" in text else None

    shown = str(lab.page.wait_for(stalled, "the doctor's verdict on the broken boot", 150))
    print(f"\nverdict shown {lab.node.elapsed():.1f} s after power-on: {shown}")
    report = lab.api(f"/machines/{NODE_MAC}/doctor")
    assert report["ok"] is False, report
    # The doctor's cause, in its own words, up to the first colon: the page says the same.
    cause = report["verdict"].split(":")[0]
    assert cause == f"{NODE} fetched iPXE but never the script", report["verdict"]
    assert cause in shown and "port 80" in shown, (shown, report["verdict"])
    # The stage bar shows where it stopped: the script it never got.
    lab.page.wait_for(
        lambda d: stage_bar(d).get("script") == "failed", "the stage bar's script failed"
    )
    lab.page.screenshot(f"{SCREENSHOT}-machine-broken-boot")
    lab.done.add("broken")


def test_a_power_button_drives_the_qemu_machine_and_shows_the_verified_outcome(
    lab: Lab,
) -> None:
    lab.need("broken")
    # The firewall goes: SeaBIOS retries the network boot and the OS phones home, which is
    # how the `on` the page sent is seen done.
    lab.agent_host.run(["nft", "delete", "table", "inet", NFT_TABLE])
    outcome = "#power-outcome"
    lab.page.wait_for(
        lambda d: lab.attribute(outcome, "data-outcome") == "done", "power on seen done",
        BOOT_WAIT,
    )  # fmt: skip
    on_text = lab.text_of(outcome)
    print(f"\npower on outcome {lab.node.elapsed():.1f} s after power-on: {on_text}")
    assert re.match(r"up \d+ s after power on by qemu at ", on_text), on_text
    assert f"PIXIEBOX-TESTOS: up {NODE}" in lab.node.console_text()
    lab.page.wait_for(
        lambda d: lab.attribute('ol#stagebar > li[data-stage="up"]', "data-status") == "done",
        "the stage bar's up done after the retry",
    )
    lab.page.screenshot(f"{SCREENSHOT}-machine-powered-on")
    # Off: seen done when the qemu driver reads QEMU's run state off.
    lab.wait_visible('button[data-power="off"]').click()

    def off_done(driver: WebDriver) -> str | None:
        # State and text in one read: the click first shows a pending sentence.
        state, text = driver.execute_script(
            "const e = document.querySelector(arguments[0]);"
            "return [e.dataset.outcome || '', e.textContent];",
            outcome,
        )  # fmt: skip
        return str(text) if state == "done" and "reads off" in str(text) else None

    off_text = lab.page.wait_for(off_done, "power off seen done", 60)
    print(f"power off outcome: {off_text}")
    assert "reads off" in lab.cli("power", NODE, "status")
    assert lab.node.proc.poll() is None  # off, not gone
    lab.page.screenshot(f"{SCREENSHOT}-machine-powered-off")
    lab.done.add("power")


def test_the_lab_and_settings_views(lab: Lab) -> None:
    lab.go("#/lab")
    enrolled = {STRANGER, NODE_MAC} if "enrolled" in lab.done else {NODE_MAC}
    lab.page.wait_for(
        lambda d: timeline_macs(d) >= enrolled, "a timeline row for each enrolled machine"
    )
    lab.wait_visible("#boot-times svg")
    lab.page.screenshot(f"{SCREENSHOT}-lab")
    lab.go("#/settings")
    lab.page.wait_text("pre#labtoml", 'name = "worker1"' if "enrolled" in lab.done else "[lab]")
    lab.page.wait_for(
        lambda d: lab.visible("#findings-ok") or d.find_elements(
            By.CSS_SELECTOR, "ul#findings li[data-severity]"),
        "check's findings (or none)",
    )  # fmt: skip
    assert "Every comment here must survive" in lab.text_of("pre#labtoml")
    lab.page.screenshot(f"{SCREENSHOT}-settings")
    lab.go("#/")
    lab.page.viewport(360, 800)
    try:
        lab.page.screenshot(f"{SCREENSHOT}-machines-360")
    finally:
        lab.page.viewport(1280, 800)
    lab.assert_not_reloaded()


def test_the_page_asked_nothing_of_anyone_but_the_agent(lab: Lab) -> None:
    requested = lab.page.requests()
    assert f"{ORIGIN}/" in requested and any("/api/v1/events" in url for url in requested)
    assert lab.page.requests_outside(ORIGIN) == []
