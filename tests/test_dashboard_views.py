"""Issue 14: every view of the dashboard in a real browser, without VMs (fast).

One agent in a namespace and one Chromium in another (a laptop on the lab segment) serve every
test of this module, in order: machines appear by real DHCP (a PXE DISCOVER from scapy, a boot
script fetched with curl, a phone-home, a syslog line from util-linux `logger`) while the page is
open; the machine list, a machine, the lab and the settings render what the API says; a wrong
token is refused with the API's sentence and nothing else changes; the right one signs in and
the Enroll form, prefilled, adds the machine to lab.toml with every comment kept. Each view is
screenshotted at 1280 and 360 px wide into out/screenshots/ (dashboard-*.png): look at them.
The QEMU versions of these (stages of a real boot, power through the qemu driver, a broken boot)
are tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import netlab
import pytest
from agentproc import RunningAgent, lab_toml, start_agent
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

if TYPE_CHECKING:  # imported at run time by pytest_plugins, which must come first
    from browser import Browser

#: Brings tests/browser.py in as a plugin (the way test_browser_smoke does), so that importing
#: it here does not bypass pytest's assertion rewriting for it.
pytest_plugins = ["browser"]

SUBNET = "10.83.0.0/24"
AGENT_IP = "10.83.0.2"
LAPTOP_IP = "10.83.0.9"
ORIGIN = f"http://{AGENT_IP}:8080"
C1, C1_IP = "02:00:00:00:83:01", "10.83.0.31"
C2, C2_IP = "02:00:00:00:83:02", "10.83.0.32"
PLUG_IP = "10.83.0.6"  # a Shelly plug (tests/powerpeers.py) that c2 is plugged into
STRANGER = "00:04:4b:00:83:99"  # an NVIDIA OUI: the vendor column has something to show
UUID = bytes(range(16))
COMMENT = "# The bench lab: two nodes under the desk (this comment must survive an enroll)"
WIDE, NARROW = (1280, 800), (360, 800)
T = TypeVar("T")
TESTS = Path(__file__).resolve().parent


@dataclass
class Lab:
    segment: netlab.Segment
    agent: RunningAgent
    page: Browser
    token: str
    hosts: dict[str, netlab.Host]

    @property
    def config(self) -> Path:
        return self.agent.config

    def api(self, path: str) -> object:
        out = self.agent.host.run(["curl", "-sS", "--max-time", "10", f"{ORIGIN}{path}"]).stdout
        return json.loads(out)


C2_POWER = f'power = {{ driver = "shelly", host = "{PLUG_IP}" }}'


def plug(segment: netlab.Segment, machine: netlab.Host) -> None:
    """A Shelly plug whose relay powers `machine`: on, its OS phones home (it is up)."""
    host = segment.add_host("plug", ip=f"{PLUG_IP}/24")
    on = (f"ip netns exec {machine.name} curl -sS --max-time 10 -X POST "
          f"http://{AGENT_IP}/api/v1/phone-home")  # fmt: skip
    log = host.log_path("plug-calls")
    proc = host.popen([sys.executable, str(TESTS / "powerpeers.py"), "plugs", "--log", str(log),
                       "--wire", PLUG_IP, on, "true"], host.log_path("plug"))  # fmt: skip
    netlab.wait_until(lambda: "plugs listening" in segment.log_of(proc).read_text(), 10, 0.1,
                      "the plug listening")  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    from browser import Browser, browser_problem  # after pytest_plugins registered it

    problem = netlab.prerequisite_problem(("curl", "logger")) or browser_problem()
    if problem and os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"CI=true but a prerequisite is missing: {problem}", pytrace=False)
    if problem:
        pytest.skip(problem)
    workdir = tmp_path_factory.mktemp("dashboard-views")
    segment = netlab.Segment(workdir / "netlab")
    page: Browser | None = None
    try:
        token_file = workdir / "api-token"
        text = lab_toml(
            mode="reservation",
            subnet=SUBNET,
            assets=workdir / "assets",
            state=workdir / "state",
            machines=[("c1", C1, C1_IP), ("c2", C2, C2_IP)],
        )
        text = f"{COMMENT}\n" + text.replace(
            "[http]",
            f'[api]\ntoken_file = "{token_file}"\n'
            '[power]\non_timeout = "10s"\noff_timeout = "10s"\noff_settle = "1s"\n[http]',
        )
        text = text.replace('name = "c2"\n', f'name = "c2"\n{C2_POWER}\n')
        hosts = {
            "c1": segment.add_host("c1", mac=C1, ip=f"{C1_IP}/24"),
            "c2": segment.add_host("c2", mac=C2, ip=f"{C2_IP}/24"),
            "stranger": segment.add_host("stranger", mac=STRANGER),
        }
        plug(segment, hosts["c2"])
        agent = start_agent(segment.add_host("agent", ip=f"{AGENT_IP}/24"), text, workdir)
        page = Browser(segment.add_host("laptop", ip=f"{LAPTOP_IP}/24"), workdir / "browser")
        yield Lab(segment, agent, page, token_file.read_text().strip(), hosts)
    finally:
        if page is not None:
            page.close()
        segment.close()


# -- helpers -----------------------------------------------------------------------------------


def until(page: Browser, condition: Callable[[WebDriver], T | None], what: str) -> T:
    """page.wait_for, where an element replaced meanwhile (a live row re-drawn) is "not yet"."""

    def check(driver: WebDriver) -> T | None:
        try:
            return condition(driver)
        except StaleElementReferenceException:
            return None

    return cast(T, page.wait_for(check, what))


def find(page: Browser, css: str) -> WebElement:
    return page.driver.find_element(By.CSS_SELECTOR, css)


def found(page: Browser, css: str) -> list[WebElement]:
    return page.driver.find_elements(By.CSS_SELECTOR, css)


def wait_css(page: Browser, css: str, what: str = "") -> WebElement:
    """The first element matching `css`, once there is one."""

    def present(driver: WebDriver) -> WebElement | None:
        elements = driver.find_elements(By.CSS_SELECTOR, css)
        return elements[0] if elements else None

    element: WebElement = until(page, present, what or f"an element {css!r}")
    return element


def wait_visible(page: Browser, css: str) -> WebElement:
    def shown(driver: WebDriver) -> WebElement | None:
        elements = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        return elements[0] if elements else None

    element: WebElement = until(page, shown, f"{css!r} visible")
    return element


def attribute(page: Browser, css: str, name: str) -> str:
    elements = found(page, css)
    return (elements[0].get_attribute(name) or "") if elements else ""


def screenshots(page: Browser, name: str, narrow_height: int = 800) -> None:
    """The view at a laptop's width, then at a phone's (taller, to see more of it)."""
    page.screenshot(f"dashboard-{name}")
    page.viewport(NARROW[0], narrow_height)
    page.screenshot(f"dashboard-{name}-360")
    # Nothing sticks out sideways at 360 px: a person on a phone never scrolls a view sideways.
    overflow = page.driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    page.viewport(*WIDE)
    assert overflow <= 0, f"the {name} view is {overflow} px wider than a 360 px screen"


def dark_screenshot(page: Browser, name: str) -> None:
    """The view as a system in dark mode shows it (prefers-color-scheme: dark)."""
    dark = [{"name": "prefers-color-scheme", "value": "dark"}]
    page.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": dark})
    try:
        page.screenshot(f"dashboard-{name}-dark")
    finally:
        page.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def dialog_open(page: Browser, dialog: str) -> bool:
    return bool(page.driver.execute_script(f"return document.getElementById({dialog!r}).open"))


def boot(
    host: netlab.Host, ip: str | None, *, up: bool, syslog: str = "", secure_boot: str = ""
) -> None:
    """A PXE DISCOVER from `host`; then (with `up`) its iPXE script, a syslog line, a phone-home
    (reporting `secure_boot` when given, as the OSIE does; an empty body as older OSes do)."""
    arch = 7 if ip is None else 0
    netlab.pxe_discover(host, arch=arch, uuid=UUID, timeout=1.0,
                        user_class=None if ip is None else "iPXE")  # fmt: skip
    if not up:
        return
    host.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null",
              f"http://{AGENT_IP}/boot/{host.mac}.ipxe"])  # fmt: skip
    if syslog:
        host.run(["logger", "-n", AGENT_IP, "-P", "514", "-d", "--rfc3164", "-t", "osie", syslog])
    body = f'{{"state": "up", "secure_boot": "{secure_boot}"}}' if secure_boot else ""
    host.run(["curl", "-sS", "--max-time", "10", "-X", "POST", "--data", body,
              f"http://{AGENT_IP}/api/v1/phone-home"])  # fmt: skip


# -- the views, in order ------------------------------------------------------------------------


def test_machines_appear_by_dhcp_on_the_open_page(lab: Lab) -> None:
    page = lab.page
    page.open(f"{ORIGIN}/")
    until(page, lambda d: attribute(page, "#live", "data-state") == "live", "the stream open")
    wait_css(page, f'#rows tr[data-mac="{C1}"]', "c1's row (from lab.toml)")
    # Three machines on the wire at once, while the page is open: no reload from here on.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        jobs = [
            # c1 is a BIOS machine: its OS reports Secure Boot off.
            pool.submit(
                boot, lab.hosts["c1"], C1_IP, up=True, syslog="kubelet started", secure_boot="off"
            ),
            pool.submit(boot, lab.hosts["c2"], C2_IP, up=False),
            pool.submit(boot, lab.hosts["stranger"], None, up=False),
        ]
        for job in jobs:
            job.result()
    stranger = wait_css(page, f'#rows tr[data-mac="{STRANGER}"][data-state="discovered"]')
    wait_css(page, f'#rows tr[data-mac="{C1}"][data-state="up"]', "c1 up")
    rows = found(page, "#rows tr[data-mac]")
    assert rows[0].get_attribute("data-mac") == STRANGER, "a discovered machine is on top"
    assert "NVIDIA" in stranger.text
    assert stranger.find_elements(By.CSS_SELECTOR, "button.enroll")
    c1 = find(page, f'#rows tr[data-mac="{C1}"]')
    assert c1.find_element(By.CSS_SELECTOR, ".name").text == "c1"
    href = c1.find_element(By.CSS_SELECTOR, ".name").get_attribute("href") or ""
    assert href.endswith(f"#/machines/{C1}")
    assert c1.find_element(By.CSS_SELECTOR, 'td[data-label="Power"]').text
    last_boot = f'#rows tr[data-mac="{C1}"] td[data-label="Last boot"]'
    until(page, lambda d: "up in" in find(page, last_boot).text, "c1's last boot time")
    # A time shows relative, with the absolute one in its <time>.
    seen = find(page, f'#rows tr[data-mac="{C1}"] td[data-label="Last seen"] time')
    assert "ago" in seen.text or "now" in seen.text
    assert seen.get_attribute("datetime") and seen.get_attribute("title")
    # Search filters the rows.
    search = find(page, "#search")
    search.send_keys("83:02")
    until(page, lambda d: len(found(page, "#rows tr[data-mac]")) == 1, "the search")
    search.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
    until(page, lambda d: len(found(page, "#rows tr[data-mac]")) == 3, "all rows again")
    screenshots(page, "machines")
    dark_screenshot(page, "machines")


def test_a_wrong_token_is_refused_with_a_sentence_and_nothing_else_changes(lab: Lab) -> None:
    page = lab.page
    before = lab.config.read_text()
    find(page, f'#rows tr[data-mac="{STRANGER}"] button.enroll').click()
    # Signed out: the sign-in form opens first, saying why.
    wait_visible(page, "form#signin-form")
    assert "sign in" in page.text("#signin-why").lower()
    assert not dialog_open(page, "enroll-dialog")
    token = find(page, "form#signin-form input[name=token]")
    assert token.get_attribute("type") == "password"
    token.send_keys("not-the-token")
    token.send_keys(Keys.ENTER)
    error = wait_visible(page, "#signin-error")
    assert error.get_attribute("role") == "alert"
    until(page, lambda d: "token" in find(page, "#signin-error").text, "the API's sentence")
    assert find(page, "html").get_attribute("data-signed-in") == "false"
    assert find(page, "#signin").is_displayed() and not find(page, "#signout").is_displayed()
    assert not dialog_open(page, "enroll-dialog")
    assert lab.config.read_text() == before
    screenshots(page, "signin-refused")
    # Escape closes the form; the row is as it was.
    find(page, "form#signin-form input[name=token]").send_keys(Keys.ESCAPE)
    until(page, lambda d: not dialog_open(page, "signin-dialog"), "Escape closing the form")
    assert attribute(page, f'#rows tr[data-mac="{STRANGER}"]', "data-state") == "discovered"


def test_signed_in_the_enroll_form_adds_the_machine_keeping_comments(lab: Lab) -> None:
    page = lab.page
    before = lab.config.read_text()
    chosen = lab.api(f"/api/v1/machines/{STRANGER}/enroll")
    assert isinstance(chosen, dict) and chosen["name"], chosen
    find(page, f'#rows tr[data-mac="{STRANGER}"] button.enroll').click()
    token = wait_visible(page, "form#signin-form input[name=token]")
    token.send_keys(lab.token, Keys.ENTER)
    until(page, lambda d: find(page, "html").get_attribute("data-signed-in") == "true", "sign-in")
    assert find(page, "#signout").is_displayed() and not find(page, "#signin").is_displayed()
    # The enroll the person asked for goes on: its form, prefilled with what the agent chose.
    wait_visible(page, "form#enroll-form")
    name = find(page, "form#enroll-form input[name=name]")
    until(page, lambda d: name.get_attribute("value") == chosen["name"], "the name prefilled")
    ip = find(page, "form#enroll-form input[name=ip]")
    assert ip.get_attribute("value") == (chosen["ip"] or "")
    # A refusal lists check's words and writes nothing: c1's name is taken.
    name.clear()
    name.send_keys("c1", Keys.ENTER)
    problem = wait_css(page, "#enroll-problems li")
    assert "c1" in problem.text
    assert lab.config.read_text() == before
    screenshots(page, "enroll-refused")
    name.clear()
    name.send_keys(chosen["name"], Keys.ENTER)
    until(page, lambda d: not dialog_open(page, "enroll-dialog"), "the form closing")
    page.wait_text(f'#rows tr[data-mac="{STRANGER}"] .name', chosen["name"])
    after = lab.config.read_text()
    assert after.startswith(before) and COMMENT in after
    assert f'name = "{chosen["name"]}"' in after[len(before) :]


def test_the_machine_view(lab: Lab) -> None:
    page = lab.page
    find(page, f'#rows tr[data-mac="{C1}"] a.name').click()
    page.wait_text("#machine-title", "c1")
    stages = wait_css(page, 'ol#stagebar > li[data-stage="up"][data-status="done"]', "c1 up")
    assert stages.text
    bar = {li.get_attribute("data-stage"): li.get_attribute("data-status")
           for li in found(page, "ol#stagebar > li")}  # fmt: skip
    assert list(bar) == ["dhcp", "loader", "script", "kernel", "initrd", "os", "up", "joined"]
    assert bar["dhcp"] == "done" and bar["script"] == "done", bar
    until(page, lambda d: find(page, "#verdict").text, "the doctor's verdict")
    assert attribute(page, "#verdict", "data-ok") == "true"
    syslog = wait_css(page, '#events li[data-kind="syslog"]', "c1's syslog line")
    assert "kubelet started" in syslog.text
    kinds = [li.get_attribute("data-kind") for li in found(page, "#events li[data-kind]")]
    assert kinds.index("dhcp.offer") < kinds.index("os.up"), "newest last"
    assert found(page, "#given dt") and "10.83.0.31" in page.text("#given")
    # What its OS reported of Secure Boot at phone-home.
    assert attribute(page, "#secure-boot", "data-value") == "off"
    assert page.text("#secure-boot") == "Secure Boot: off"
    for action in ("on", "off", "cycle"):
        assert found(page, f'button[data-power="{action}"]'), action
    # No power control in lab.toml: the buttons say so by being disabled, with the reason.
    assert not find(page, 'button[data-power="on"]').is_enabled()
    assert "power control" in page.text("#power-note").lower()
    screenshots(page, "machine", narrow_height=1600)
    dark_screenshot(page, "machine")
    # Live: a new syslog line arrives without a reload.
    lab.hosts["c1"].run(["logger", "-n", AGENT_IP, "-P", "514", "-d", "--rfc3164", "-t", "osie",
                         "node ready for work"])  # fmt: skip
    page.wait_text("#events li:last-child", "node ready for work")
    # A machine's address by its name works too, and stays live (events carry the MAC).
    page.driver.execute_script("location.hash = '#/machines/c1'")
    page.wait_text("#events li:last-child", "node ready for work")
    lab.hosts["c1"].run(["logger", "-n", AGENT_IP, "-P", "514", "-d", "--rfc3164", "-t", "osie",
                         "by name"])  # fmt: skip
    page.wait_text("#events li:last-child", "by name")


def test_a_booting_machine_and_its_older_events(lab: Lab, tmp_path: Path) -> None:
    """c2 stopped after DHCP: its bar shows where it is; its syslog runs past one page."""
    page = lab.page
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"step {n:03d} of the install\n" for n in range(130)))
    lab.hosts["c2"].run(["logger", "-n", AGENT_IP, "-P", "514", "-d", "--rfc3164", "-t", "osie",
                         "-f", str(lines)])  # fmt: skip

    def stored(driver: WebDriver) -> bool:
        events = lab.api(f"/api/v1/machines/{C2}/events?limit=500")
        assert isinstance(events, list)
        return any(str(e["message"]).endswith("step 129 of the install") for e in events)

    until(page, stored, "all of c2's syslog lines stored (none arriving after the page opens)")
    page.open(f"{ORIGIN}/#/machines/{C2}")
    page.wait_text("#machine-title", "c2")
    wait_css(page, 'ol#stagebar > li[data-stage="dhcp"][data-status="done"]')
    assert found(page, 'ol#stagebar > li[data-status="current"]'), "where it is now"
    older = wait_visible(page, "button#older")
    before = len(found(page, "#events li[data-kind]"))
    assert before == 100, before
    assert "step 129" in found(page, "#events li[data-kind]")[-1].text, "newest last"
    older.click()
    until(page, lambda d: len(found(page, "#events li[data-kind]")) > before, "the older page")
    first = found(page, "#events li[data-kind]")[0]
    assert first.get_attribute("data-kind") == "machine.enrolled" or "dhcp" in (
        first.get_attribute("data-kind") or ""
    ), first.text
    screenshots(page, "machine-booting")


def test_a_power_button_shows_the_verified_outcome_and_its_steps(lab: Lab) -> None:
    """c2's plug (Shelly) switches on, c2 phones home: the page shows each step as it comes,
    then the outcome the agent verified."""
    page = lab.page
    page.wait_text("#machine-title", "c2")
    button = find(page, 'button[data-power="on"]')
    until(page, lambda d: button.is_enabled(), "the power buttons enabled (c2 has a plug)")
    assert "shelly" in page.text("#power-note")
    button.click()
    until(page, lambda d: attribute(page, "#power-outcome", "data-outcome") == "done",
          "the verified outcome")  # fmt: skip
    assert page.text("#power-outcome")
    steps = [li.text for li in found(page, "#power-steps li")]
    assert any("shelly" in step for step in steps), steps
    assert found(page, '#events li[data-kind="power.on"]'), "the power events, live"
    wait_css(page, 'ol#stagebar > li[data-stage="up"][data-status="done"]', "c2 up")
    # Its OS (the plug's phone-home, an empty body) reported nothing of Secure Boot.
    assert not found(page, "#secure-boot")
    screenshots(page, "machine-power", narrow_height=1200)


def test_the_lab_view(lab: Lab) -> None:
    page = lab.page
    find(page, 'nav a[href="#/lab"]').click()
    row = wait_css(page, f'#timeline [data-mac="{C1}"]', "c1's timeline row")
    assert row.find_elements(By.CSS_SELECTOR, "svg rect.seg")
    wait_css(page, f'#timeline [data-mac="{C2}"]', "c2's timeline row")
    assert found(page, "button#lab-up") and found(page, "button#lab-down")
    assert page.text("#all-up")
    wait_css(page, "#boot-times svg", "the boot-times plot")
    # Lab down, signed in: c2's plug switches off; the others have no power control, said so.
    find(page, "button#lab-down").click()
    until(page, lambda d: attribute(page, "#lab-outcome", "data-outcome") in {"done", "failed"},
          "lab down's report")  # fmt: skip
    report = page.text("#lab-outcome")
    assert "c1: no power control" in report and "c2:" in report, report
    screenshots(page, "lab")
    dark_screenshot(page, "lab")
    # Signed out, an action opens the sign-in form first, saying why; cancelling changes nothing.
    find(page, "button#signout").click()
    until(page, lambda d: find(page, "html").get_attribute("data-signed-in") == "false", "sign-out")
    find(page, "button#lab-up").click()
    wait_visible(page, "form#signin-form")
    assert "sign in" in page.text("#signin-why").lower()
    find(page, "form#signin-form input[name=token]").send_keys(Keys.ESCAPE)
    until(page, lambda d: not dialog_open(page, "signin-dialog"), "Escape closing the form")
    assert page.text("#lab-outcome") == report, "the last report stays; nothing was sent"


def test_the_settings_view(lab: Lab) -> None:
    page = lab.page
    # A mistake typed into the file on disk: the agent keeps what it loaded, check says why.
    lab.config.write_text(lab.config.read_text() + '[[machines]]\nname = "bad"\nmac = "zz"\n')
    find(page, 'nav a[href="#/settings"]').click()
    page.wait_text("pre#labtoml", COMMENT[2:20])
    finding = wait_css(page, 'ul#findings li[data-severity="error"]', "check's finding")
    assert "zz" in finding.text or "mac" in finding.text, finding.text
    lines = found(page, "pre#labtoml .line")
    numbers = [line.find_element(By.CSS_SELECTOR, ".ln").text.strip() for line in lines[:3]]
    assert numbers == ["1", "2", "3"], numbers
    assert not find(page, "#findings-ok").is_displayed()
    screenshots(page, "settings", narrow_height=1200)


def test_the_keyboard_alone_reaches_a_machine(lab: Lab) -> None:
    """No mouse: Tab from the top of the page to the search box, type, Tab to the machine's
    link, Enter opens it (Escape closing the forms is checked with them above)."""
    page = lab.page
    driver = page.driver
    find(page, 'nav a[href="#/"]').click()
    wait_css(page, f'#rows tr[data-mac="{C1}"] a.name', "c1's row")
    driver.execute_script("document.activeElement && document.activeElement.blur()")

    def tab_to(what: str, reached: Callable[[WebElement], bool]) -> WebElement:
        for _ in range(40):  # bounded: the header and the list's tools come first
            ActionChains(driver).send_keys(Keys.TAB).perform()
            here = driver.switch_to.active_element
            if reached(here):
                return here
        pytest.fail(f"Tab never reached {what}")

    search = tab_to("the search box", lambda e: e.get_attribute("id") == "search")
    search.send_keys("c1")
    until(page, lambda d: len(found(page, "#rows tr[data-mac]")) == 1, "the list narrowed to c1")
    link = tab_to(
        "c1's link", lambda e: e.tag_name == "a" and "name" in (e.get_attribute("class") or "")
    )
    link.send_keys(Keys.ENTER)
    page.wait_text("#machine-title", "c1")
    assert driver.execute_script("return location.hash") == f"#/machines/{C1}"
    # Back to the list: the search is cleared for the tests after this one.
    find(page, 'nav a[href="#/"]').click()
    search = wait_visible(page, "#search")
    search.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)


def test_the_page_asked_nothing_of_anyone_but_the_agent(lab: Lab) -> None:
    page = lab.page
    assert page.requests(), "the request log works"
    assert page.requests_outside(ORIGIN) == []
    errors = [line for line in page.console() if "SEVERE" in line or "Uncaught" in line]
    # The refused sign-in and enroll are answered 401/409 on purpose: Chromium logs those.
    unexpected = [line for line in errors if "401" not in line and "409" not in line]
    assert unexpected == [], unexpected
